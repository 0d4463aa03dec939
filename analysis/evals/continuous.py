"""Continuous counterparts of a multiple-choice accuracy, from the per-choice log-likelihoods lm-eval returns.

Accuracy jumps from 0 to 1 per item; the probability the model puts on the right answer moves smoothly, so
it shows progress earlier and forecasts better. Per item, with ll_j the summed log-likelihood of choice j
and c the correct one:

- ``p_correct``: softmax(ll)_c, the correct answer's probability normalised over the choices;
- ``margin``: ll_c - max over j != c of ll_j (positive exactly when the item is answered right);
- ``nll_per_token``: -ll_c / (tokens of the correct continuation), counted the way lm-eval splits context
  and continuation (trailing spaces of the context move to the continuation; the continuation's tokens are
  those of context + continuation past the context's own);
- ``bits_per_byte``: -ll_c / ln 2 / (UTF-8 bytes of the correct continuation).

Each is the mean over items, with the stderr of that mean (items are the sampling unit), stored as
``<task>/<name>,none`` beside the task's accuracy. ``loglikelihood`` tasks (one continuation) get the two
NLL forms only. Items are counted once even when lm-eval logs them under several metrics (acc, acc_norm).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from analysis.evals.lmeval import SampleRecord

NAMES = ("p_correct", "margin", "nll_per_token", "bits_per_byte")


@dataclass(frozen=True)
class ContinuousRow:
    """One continuous metric of one task: mean over items, its stderr, and the number of items."""

    task: str
    name: str
    value: float
    stderr: float | None
    n: int

    @property
    def metric(self) -> str:
        return f"{self.task}/{self.name},none"


def continuation_tokens(encode: Callable[[str], list[int]], context: str, continuation: str) -> int:
    """Tokens of ``continuation`` after ``context``, split as lm-eval splits them."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    return len(encode(context + continuation)) - len(encode(context))


def _correct_index(record: SampleRecord) -> int | None:
    try:
        index = int(record.target)
    except (TypeError, ValueError):
        choices = record.choices or ()
        return choices.index(record.target) if record.target in choices else None
    return index if 0 <= index < len(record.loglikelihoods or ()) else None


def item_values(record: SampleRecord, encode: Callable[[str], list[int]] | None = None) -> dict[str, float]:
    """The continuous metrics of one item (those its record allows)."""
    lls = np.asarray(record.loglikelihoods or (), dtype=float)
    choices = record.choices or ()
    if len(lls) == 0 or len(choices) != len(lls):
        return {}
    c = 0 if len(lls) == 1 else _correct_index(record)
    if c is None:
        return {}
    out: dict[str, float] = {}
    if len(lls) > 1:
        shifted = np.exp(lls - lls.max())
        out["p_correct"] = float(shifted[c] / shifted.sum())
        out["margin"] = float(lls[c] - np.delete(lls, c).max())
    if encode is not None:
        tokens = continuation_tokens(encode, record.prompt, choices[c])
        if tokens > 0:
            out["nll_per_token"] = float(-lls[c] / tokens)
    n_bytes = len(choices[c].encode("utf-8"))
    if n_bytes > 0:
        out["bits_per_byte"] = float(-lls[c] / math.log(2) / n_bytes)
    return out


def continuous_metrics(
    samples: Iterable[SampleRecord], encode: Callable[[str], list[int]] | None = None
) -> list[ContinuousRow]:
    """Per task, the mean of each continuous metric over its items (see the module docstring)."""
    per_task: dict[str, dict[int, dict[str, float]]] = {}
    for record in samples:
        if record.loglikelihoods is None or record.choices is None:
            continue
        items = per_task.setdefault(record.task, {})
        if record.doc_id not in items:
            items[record.doc_id] = item_values(record, encode)
    rows = []
    for task, items in sorted(per_task.items()):
        for name in NAMES:
            values = np.array([v[name] for v in items.values() if name in v])
            if len(values) == 0:
                continue
            stderr = float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else None
            rows.append(ContinuousRow(task, name, float(values.mean()), stderr, len(values)))
    return rows
