"""The fine-tune probe (analysis/finetune) as job work: one fine-tune of a copy per checkpoint.

Stored under ``finetune/<task>/<what>``. A fine-tune is the longest item there is, so Ray gives
each its own task.
"""

from __future__ import annotations

from analysis.finetune import FINETUNE
from analysis.jobs.kinds.base import ItemProgress, Output, UnitContext, WorkKind, register
from analysis.jobs.spec import Item, JobSpec, probe_params, probe_path


@register
class FinetuneKind(WorkKind):
    """Score, fine-tune a copy, score the copy, compare (analysis/finetune/probe.py)."""

    name = "finetune"
    requests = (FINETUNE,)
    uses_probe = True  # the forgetting rows are held-out loss changes on the probe set

    def plan(self, spec: JobSpec, request: str) -> list[Item]:
        from analysis.finetune.config import item_params, parse_config
        from analysis.finetune.data import task_name

        config = parse_config(spec.metric_params.get(request, {}), max_length=spec.max_length)
        return [Item(self.name, task_name(config.task), item_params(config, probe_params(spec)), data=probe_path(spec))]

    def produces(self, item: Item, metric: str) -> bool:
        scope, _, leaf = metric.partition("/")
        return scope == FINETUNE and leaf.split("/", 1)[0] == item.name

    def group(self, item: Item) -> str:
        return f"finetune:{item.name}"

    def compute(self, item: Item, ctx: UnitContext, progress: ItemProgress | None = None) -> Output:
        from analysis.finetune.config import config_from_params, keep_folder
        from analysis.finetune.probe import run_probe
        from analysis.models import resolve_tokenizer

        spec = ctx.spec
        cfg = config_from_params(item.params)
        tok = resolve_tokenizer(ctx.tokenizer, f"fine-tuning on {cfg.task}")
        keep = spec.metric_params.get(FINETUNE, {}).get("keep")
        folder = keep_folder(keep, ctx.run, ctx.step, item.params_hash, ctx.checkpoint)
        found = run_probe(
            ctx.model, tok, cfg, probe=ctx.probe, batch_size=spec.batch_size, eval_seed=spec.seed,
            pad_id=ctx.pad_id, keep=folder, progress=progress,
        )  # fmt: skip
        version = item.params["version"]
        return [ctx.row(item, r.metric, r.value, r.stderr, r.n, version, r.higher_is_better) for r in found], []
