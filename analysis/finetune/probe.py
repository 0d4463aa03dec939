"""The fine-tune probe on one loaded checkpoint: score it, fine-tune a copy, score the copy, compare.

Stored per checkpoint, under ``finetune/<task>/``:

- ``pre``: the task's score (its lm-eval metric, ``cfg.score`` or the task's first) of the untuned checkpoint,
  measured here with the same documents and settings as ``post``;
- ``post``: the score after fine-tuning (the mean over seeds); its stderr is the items' (lm-eval's) and,
  with several seeds, the seeds' spread: sqrt(se_items^2 + s_seeds^2 / k);
- ``gain``: post - pre, with the stderr of the per-document differences (the same documents are scored
  before and after, so the change is known better than two independent stderrs say), plus the seeds' spread;
- ``train_loss``: the fine-tuning loss over its last 10 steps;
- ``forgetting_<domain>``: held-out loss of the probe set's domain after minus before (nats per token;
  positive = forgot), stderr over the per-sample differences;
- ``change:<other task>/<metric>``: another task's score after minus before (forgetting of what it knew).

Nothing is written while this runs; the runner stores the rows in one transaction with the unit's status.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from analysis.finetune import FINETUNE
from analysis.finetune.config import FinetuneConfig
from analysis.finetune.data import encode_examples, eval_spec, load_task, task_name
from analysis.finetune.train import fine_tune


@dataclass(frozen=True)
class ProbeRow:
    """One stored number of the probe."""

    metric: str
    value: float
    stderr: float | None
    n: int | None
    higher_is_better: bool | None = None


@dataclass(frozen=True)
class Score:
    """One task's score on one model: the value, its stderr, per-document values, direction."""

    metric: str  # "acc,none"
    value: float
    stderr: float | None
    items: dict[str, float]  # per-document values whose mean is the score; empty for a corpus-level score
    higher_is_better: bool | None


def score_task(
    model, tokenizer, spec: str, *, metric: str | None, limit: int | None, batch_size: int, seed: int
) -> Score:
    """The task's score (``metric``, or its first) on ``model`` through lm-eval, with per-document values."""
    from analysis.evals.lmeval import run_lm_eval

    out = run_lm_eval(
        model, tokenizer, [spec], batch_size=batch_size, limit=limit, log_samples=True, seed=seed, bootstrap_iters=0
    )
    rows = [r for r in out.rows if r.value is not None and math.isfinite(r.value)]
    if not rows:
        raise ValueError(f"{spec}: lm-eval reported no score; check the task")
    # By default the task's first score that is better higher (accuracy before perplexity), else its first.
    chosen = (
        [r for r in rows if r.metric == metric] if metric else [*(r for r in rows if r.higher_is_better), *rows][:1]
    )
    if not chosen:
        raise ValueError(f"{spec}: no metric {metric!r}; it reports {', '.join(r.metric for r in rows)}")
    row = chosen[0]
    items = {str(s.doc_id): float(s.value) for s in out.samples if s.metric == row.metric and s.value is not None}
    if not items or not math.isclose(float(np.mean(list(items.values()))), row.value, abs_tol=1e-9):
        # A corpus-level score (perplexity: the per-document values are log-likelihoods) is no mean of its
        # documents' values, so they give no paired stderr of its change.
        items = {}
    stderr = row.stderr
    if stderr is None and len(items) > 1:
        # A mean over documents (accuracy, exact match): its stderr over them, as lm-eval computes it.
        stderr = float(np.std(list(items.values()), ddof=1) / math.sqrt(len(items)))
    return Score(row.metric, float(row.value), stderr, items, row.higher_is_better)


def _paired_se(before: dict[str, float], after: list[dict[str, float]]) -> float | None:
    """Stderr of the mean per-item change (after averaged over seeds) over the items scored every time."""
    keys = sorted(set(before).intersection(*after))
    if len(keys) < 2:
        return None
    diff = np.array([np.mean([a[k] for a in after]) - before[k] for k in keys])
    return float(diff.std(ddof=1) / math.sqrt(len(diff)))


def _with_seeds(se: float | None, values: list[float]) -> float | None:
    """An item stderr widened by the spread over seeds: sqrt(se^2 + s^2 / k); se alone for one seed."""
    if len(values) < 2:
        return se
    seeds_var = float(np.var(values, ddof=1)) / len(values)
    return math.sqrt((se or 0.0) ** 2 + seeds_var)


def _heldout(model, probe, batch_size: int) -> dict:
    from analysis.evals.heldout import heldout_loss

    return heldout_loss(model, probe, batch_size=batch_size) if probe is not None else {}


def run_probe(
    model: torch.nn.Module,
    tokenizer,
    cfg: FinetuneConfig,
    *,
    probe=None,
    batch_size: int = 16,
    eval_seed: int = 0,
    pad_id: int = 0,
    keep: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[ProbeRow]:
    """Every stored number of the probe for one loaded checkpoint (see the module docstring).

    ``probe``: the probe set (``analysis.evals.heldout.ProbeSet``) whose held-out loss measures forgetting
    (None: no held-out rows). ``keep``: a folder to save the (last seed's) fine-tuned copy into, written
    under a temporary name and renamed, so an interrupted run leaves no half copy. ``progress(i, n)``
    follows the fine-tuning updates over all seeds.
    """
    task = load_task(cfg.task)
    examples = encode_examples(task.train, tokenizer, cfg.max_length)

    def score(m, spec: str, metric: str | None) -> Score:
        """One task's score on ``m`` with the settings every score of the probe shares."""
        return score_task(m, tokenizer, spec, metric=metric, limit=cfg.limit, batch_size=batch_size, seed=eval_seed)

    pre = score(model, task.eval_spec, cfg.score)
    others = [eval_spec(t) for t in cfg.other_tasks]
    others_pre = [score(model, t, None) for t in others]
    loss_pre = _heldout(model, probe, batch_size)
    post: list[Score] = []
    others_post: list[list[Score]] = []
    loss_post: list[dict] = []
    final_losses: list[float] = []
    for k in range(cfg.seeds):

        def seed_progress(i: int, n: int, k: int = k) -> None:
            if progress is not None:
                progress(k * n + i, n * cfg.seeds)

        tuned = fine_tune(model, examples, cfg, seed=cfg.seed + k, pad_id=pad_id, progress=seed_progress)
        try:
            post.append(score(tuned.model, task.eval_spec, pre.metric))
            pairs = zip(others, others_pre, strict=True)
            others_post.append([score(tuned.model, t, o.metric) for t, o in pairs])
            loss_post.append(_heldout(tuned.model, probe, batch_size))
            final_losses.append(tuned.final_loss)
            if keep is not None and k == cfg.seeds - 1:
                save_copy(tuned.model, tokenizer, keep, cfg)
        finally:
            del tuned
    return _rows(task.name, pre, post, others_pre, others_post, loss_pre, loss_post, final_losses, cfg)


def _rows(name, pre, post, others_pre, others_post, loss_pre, loss_post, final_losses, cfg) -> list[ProbeRow]:
    scope = f"{FINETUNE}/{name}"
    values = [s.value for s in post]
    post_value = float(np.mean(values))
    item_se = post[0].stderr
    n_items = len(pre.items) or None
    rows = [
        ProbeRow(f"{scope}/pre", pre.value, pre.stderr, n_items, pre.higher_is_better),
        ProbeRow(f"{scope}/post", post_value, _with_seeds(item_se, values), n_items, pre.higher_is_better),
        ProbeRow(
            f"{scope}/gain",
            post_value - pre.value,
            _with_seeds(_paired_se(pre.items, [s.items for s in post]), values),
            n_items,
            pre.higher_is_better,
        ),
        ProbeRow(f"{scope}/train_loss", float(np.mean(final_losses)), None, cfg.seeds, False),
    ]
    for domain, before in sorted(loss_pre.items()):
        afters = [lp[domain] for lp in loss_post]
        change = float(np.mean([a.mean_nll for a in afters])) - before.mean_nll
        diffs = np.mean([np.array(a.per_sample_nll) for a in afters], axis=0) - np.array(before.per_sample_nll)
        se = float(diffs.std(ddof=1) / math.sqrt(len(diffs))) if len(diffs) > 1 else None
        rows.append(ProbeRow(f"{scope}/forgetting_{domain}", change, se, before.n_samples, False))
    for j, (spec, before) in enumerate(zip(cfg.other_tasks, others_pre, strict=True)):
        afters = [op[j] for op in others_post]
        vals = [a.value for a in afters]
        se = _with_seeds(_paired_se(before.items, [a.items for a in afters]), vals)
        label = task_name(spec)
        rows.append(
            ProbeRow(
                f"{scope}/change:{label}/{before.metric}",
                float(np.mean(vals)) - before.value,
                se,
                len(before.items) or None,
                before.higher_is_better,
            )
        )
    return rows


def save_copy(model: torch.nn.Module, tokenizer, folder: Path, cfg: FinetuneConfig) -> Path:
    """Save a fine-tuned copy (safetensors, tokenizer, ``finetune.json`` with its settings) into ``folder``."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"cannot save a {type(model).__name__} as a checkpoint: keep needs a transformers model")
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "finetune.json").write_text(json.dumps({"settings": cfg.describe(), "task": cfg.task}, indent=2) + "\n")
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder
