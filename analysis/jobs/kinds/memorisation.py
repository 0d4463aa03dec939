"""Per-sample loss and expert pathway of every probe sample, stored per checkpoint.

The memorisation groups and the pathway metrics inside them are read from these records later
(analysis/memorisation.py); the job stores ``<domain>/sample_loss`` and one record per sample.
"""

from __future__ import annotations

import numpy as np

from analysis.jobs.kinds.base import Batch, ItemProgress, Output, UnitContext, WorkKind, register
from analysis.jobs.spec import MEMORISATION, Item, JobSpec, probe_params, probe_path

DEFAULTS = {"answer_tokens": 0, "threshold": 0.7}  # 0: score every predicted token
VERSION = "1"


def memorisation_params(given: dict) -> dict:
    """``answer_tokens`` (score only the last K tokens of each sample; 0 = all) and the pathway ``threshold``."""
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"memorisation has no setting {unknown[0]!r}; it takes {', '.join(DEFAULTS)}")
    out = dict(DEFAULTS)
    try:
        if "answer_tokens" in given:
            out["answer_tokens"] = int(given["answer_tokens"])
        if "threshold" in given:
            out["threshold"] = float(given["threshold"])
    except (TypeError, ValueError):
        raise ValueError(f"memorisation settings must be numbers, got {given}") from None
    if out["answer_tokens"] < 0 or not 0 < out["threshold"] <= 1:
        raise ValueError("memorisation: answer_tokens must be >= 0 and threshold in (0, 1]")
    return out


def plain_batches(seqs, batch_size: int, pad_id: int = 0) -> list[Batch]:
    """Right-padded batches of ``seqs`` in order (sample i of the output is seqs[i])."""
    from analysis.evals.heldout import right_pad

    batches = []
    for i in range(0, len(seqs), batch_size):
        ids, mask = right_pad([list(s) for s in seqs[i : i + batch_size]], pad_id)
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


@register
class MemorisationKind(WorkKind):
    """Every probe sample's loss and pathway (all of them, not just the metric batches)."""

    name = "samples"
    requests = (MEMORISATION,)
    uses_probe = True

    def plan(self, spec: JobSpec, request: str) -> list[Item]:
        params = {**probe_params(spec), "version": VERSION, **memorisation_params(spec.metric_params.get(request, {}))}
        return [Item(self.name, MEMORISATION, params, data=probe_path(spec))]

    def produces(self, item: Item, metric: str) -> bool:
        return metric.partition("/")[2] == "sample_loss"

    def compute(self, item: Item, ctx: UnitContext, progress: ItemProgress | None = None) -> Output:
        from analysis.memorisation import sample_records
        from analysis.metrics.pathways import routing_profile

        rows, samples = [], []
        for domain, seqs in sorted(ctx.probe.domains.items()):
            batches = plain_batches(seqs, ctx.spec.batch_size, ctx.pad_id)
            profile = routing_profile(ctx.model, batches, device=ctx.device, keep_nll=True)
            records = sample_records(
                profile, threshold=item.params["threshold"], answer_tokens=item.params["answer_tokens"]
            )
            metric = f"{domain}/sample_loss"
            samples += [ctx.sample(item, metric, str(i), r["loss"], r) for i, r in enumerate(records)]
            losses = np.array([r["loss"] for r in records])
            stderr = float(losses.std(ddof=1) / np.sqrt(len(losses))) if len(losses) > 1 else None
            rows.append(ctx.row(item, metric, float(losses.mean()), stderr, len(losses), item.params["version"]))
        return rows, samples
