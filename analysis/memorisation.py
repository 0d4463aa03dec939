"""Memorisation groups: which training samples a run memorised when, and how routing changes inside them.

Two halves:

- On one checkpoint (:func:`sample_records`): each probe sample's loss and expert pathway,
  read in one forward pass. The job runner stores them as sample rows (metric
  ``<domain>/sample_loss``), so nothing here needs the model again.
- Across checkpoints (:func:`memorisation_table`, :func:`group_trends`): from the stored
  rows, the step from which each sample counts as memorised (DESIGN.md: loss <= eps at
  that checkpoint and every later one, and within delta of its final loss), the samples
  grouped by that step, and per checkpoint each group's mean pathway distance, pathway
  consistency and loss. The claim to check on a grokking run: inside memorised groups,
  pathway distance falls and consistency rises while downstream accuracy rises.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from analysis.metrics.pathways.consistency import consistency_cosines, normalize_by_max
from analysis.metrics.pathways.distance import mean_pairwise_distance
from analysis.metrics.pathways.extraction import pathway_table, pathway_texts
from analysis.metrics.pathways.routing import RoutingProfile

if TYPE_CHECKING:  # for the annotation only: importing the store at run time would load duckdb with this module
    from analysis.store import Store

DEFAULT_EPS = 0.1  # nats: a sample counts as learnt below this loss (p(answer) >= 0.9 for one answer token)
DEFAULT_DELTA = 0.05  # and within this of its loss at the last checkpoint
NEVER = -1  # memorisation step of a sample never memorised
GROUP_METRICS = ("pathway_distance", "pathway_consistency", "pathway_consistency_normalized", "sample_loss")


def sample_losses(token_nll: np.ndarray, answer_tokens: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Each sample's mean NLL over its last ``answer_tokens`` predicted tokens (0: all of them).

    ``token_nll`` is (N, T-1) with NaN on padding (right-padded). Returns (loss, n_scored),
    both (N,). A sample with fewer predicted tokens than ``answer_tokens`` scores all it has.
    """
    real = ~np.isnan(token_nll)
    if answer_tokens > 0:
        from_end = np.cumsum(real[:, ::-1], axis=1)[:, ::-1]  # 1 at the last real token, 2 before it, ...
        real = real & (from_end <= answer_tokens)
    n = real.sum(axis=1)
    total = np.where(real, token_nll, 0.0).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, total / n, np.nan), n


def sample_records(profile: RoutingProfile, *, threshold: float = 0.7, answer_tokens: int = 0) -> list[dict]:
    """Per sample of a profile taken with ``keep_nll``: loss, tokens scored, pathway and consistency."""
    if profile.token_nll is None:
        raise ValueError("sample_records needs a routing profile taken with keep_nll=True")
    loss, n_scored = sample_losses(profile.token_nll, answer_tokens)
    paths = pathway_texts(pathway_table(profile.weights, threshold), chars=True)
    raw = norm = [None] * profile.n_samples
    if profile.routers is not None and len(profile.routers) >= 2:
        cos = consistency_cosines(profile.weights, profile.routers)
        raw = cos.mean(axis=1).tolist()
        norm = normalize_by_max(cos).mean(axis=1).tolist()
    return [
        {
            "loss": float(loss[i]),
            "scored_tokens": int(n_scored[i]),
            "pathway": paths[i],
            "consistency": raw[i],
            "consistency_normalized": norm[i],
        }
        for i in range(profile.n_samples)
    ]


# --- the memorisation criterion -----------------------------------------------------------------------------


def memorised_from(
    losses: np.ndarray | Sequence[Sequence[float]],
    steps: np.ndarray | Sequence[int],
    eps: float,
    delta: float = 0.05,
) -> np.ndarray:
    """The step from which each training sample counts as memorised, or -1.

    ``losses`` is (n_checkpoints, n_samples), rows in the order of ``steps`` (strictly
    increasing). A sample is memorised from t* when at t* and every later checkpoint its
    loss is <= eps and within delta of its loss at the last checkpoint; t* is the
    earliest such checkpoint. A NaN loss breaks the run. Returns (n_samples,) int64.
    """
    losses = np.asarray(losses, dtype=np.float64)
    steps = np.asarray(steps, dtype=np.int64)
    if losses.ndim != 2 or steps.ndim != 1 or losses.shape[0] != steps.shape[0] or len(steps) == 0:
        raise ValueError(
            f"memorised_from: losses must be (n_checkpoints, n_samples) with one row per step; "
            f"got losses {losses.shape} and {steps.shape[0] if steps.ndim == 1 else steps.shape} steps"
        )
    if np.any(np.diff(steps) <= 0):
        raise ValueError("memorised_from: steps must be strictly increasing; sort checkpoints by step first")
    if not math.isfinite(eps) or not math.isfinite(delta) or delta < 0:
        raise ValueError(f"memorised_from: eps must be finite and delta a number >= 0, got eps={eps}, delta={delta}")
    ok = (losses <= eps) & (np.abs(losses - losses[-1]) <= delta)  # (C, S)
    from_here = np.flip(np.logical_and.accumulate(np.flip(ok, axis=0), axis=0), axis=0)  # ok at every later one
    first = from_here.argmax(axis=0)  # (S,) earliest checkpoint of the final run
    return np.where(from_here[-1], steps[first], -1).astype(np.int64)


def group_by_memorisation(
    first_steps: np.ndarray | Sequence[int], bins: Sequence[int] | None = None
) -> dict[int, np.ndarray]:
    """Sample indices grouped by memorisation step (-1: never memorised), keys ascending.

    With ``bins`` (increasing step edges), memorised samples are grouped by the bin
    [edge_i, edge_{i+1}) their step falls in, keyed by edge_i; steps before the first
    edge join the first bin, the last bin is open-ended.
    """
    first_steps = np.asarray(first_steps, dtype=np.int64)
    keys = first_steps.copy()
    if bins is not None:
        edges = np.asarray(bins, dtype=np.int64)
        if edges.ndim != 1 or len(edges) == 0 or np.any(np.diff(edges) <= 0):
            raise ValueError("group_by_memorisation: bins must be a non-empty, strictly increasing list of steps")
        memorised = first_steps >= 0
        slot = np.clip(np.searchsorted(edges, first_steps, side="right") - 1, 0, len(edges) - 1)
        keys = np.where(memorised, edges[slot], -1)
    return {int(k): np.flatnonzero(keys == k) for k in np.unique(keys)}


# --- across checkpoints, from stored sample rows ----------------------------------------------------------


@dataclass(frozen=True)
class MemorisationTable:
    """Per-sample values over checkpoints (rows: steps ascending; columns: samples)."""

    steps: np.ndarray  # (C,)
    sample_ids: list[str]  # (S,)
    loss: np.ndarray  # (C, S) NaN where a checkpoint lacks the sample
    pathways: np.ndarray  # (C, S) object: pathway strings, None where missing
    consistency: np.ndarray  # (C, S)
    consistency_normalized: np.ndarray  # (C, S)
    first_step: np.ndarray  # (S,) memorisation step, NEVER if not memorised
    eps: float
    delta: float


def memorisation_table(
    samples: pd.DataFrame, *, eps: float = DEFAULT_EPS, delta: float = DEFAULT_DELTA
) -> MemorisationTable:
    """Pivot stored sample rows (columns step, sample_id, value, record) and find each sample's memorisation step.

    ``record`` is the dict :func:`sample_records` wrote (or its JSON text). Samples missing at
    some checkpoint count as not memorised there (NaN loss breaks a run of low losses).
    """
    needed = {"step", "sample_id", "value", "record"}
    if not needed <= set(samples.columns):
        raise ValueError(f"sample rows need columns {sorted(needed)}, got {sorted(samples.columns)}")
    if samples.empty:
        raise ValueError("no per-sample rows; compute them with `python -m analysis eval --metrics memorisation`")
    frame = samples.copy()
    frame["record"] = frame["record"].map(_as_dict)
    steps = np.array(sorted(frame["step"].unique()), dtype=np.int64)
    ids = sorted(frame["sample_id"].astype(str).unique(), key=_natural)
    row = {s: i for i, s in enumerate(steps)}
    col = {s: j for j, s in enumerate(ids)}
    shape = (len(steps), len(ids))
    loss = np.full(shape, np.nan)
    cons = np.full(shape, np.nan)
    norm = np.full(shape, np.nan)
    paths = np.full(shape, None, dtype=object)
    for step, sid, value, record in frame[["step", "sample_id", "value", "record"]].itertuples(index=False):
        i, j = row[step], col[str(sid)]
        loss[i, j] = np.nan if value is None else float(value)
        paths[i, j] = record.get("pathway")
        cons[i, j] = _num(record.get("consistency"))
        norm[i, j] = _num(record.get("consistency_normalized"))
    first = memorised_from(loss, steps, eps, delta)
    return MemorisationTable(steps, ids, loss, paths, cons, norm, first, eps, delta)


def memorisation_groups(table: MemorisationTable, n_groups: int = 4) -> dict[str, np.ndarray]:
    """Sample columns grouped by when they were memorised: up to ``n_groups`` step ranges, plus "never".

    Ranges split the memorised samples' steps at quantiles (so groups are about equal in size)
    and are labelled by the checkpoint steps they span, e.g. "memorised 43-79". Keys in order.
    """
    first = table.first_step
    done = np.flatnonzero(first != NEVER)
    groups: dict[str, np.ndarray] = {}
    if len(done):
        cuts = np.unique(np.quantile(first[done], np.linspace(0, 1, n_groups + 1)[1:-1], method="lower"))
        slot = np.searchsorted(cuts, first[done], side="left")
        for k in np.unique(slot):
            members = done[slot == k]
            lo, hi = int(first[members].min()), int(first[members].max())
            groups[f"memorised {lo}" if lo == hi else f"memorised {lo}-{hi}"] = members
    never = np.flatnonzero(first == NEVER)
    if len(never):
        groups["never memorised"] = never
    return groups


def group_trends(
    table: MemorisationTable, groups: dict[str, np.ndarray], *, max_pairs: int = 20_000, seed: int = 0
) -> pd.DataFrame:
    """Per checkpoint and group: mean pathway distance (with stderr), consistency (raw, normalised) and loss.

    Columns: step, group, metric, value, stderr, n. Pathway distance is the mean Levenshtein
    distance between the group's pathways in character form; a group of one sample has none.
    """
    rows = []
    for i, step in enumerate(table.steps):
        for name, members in groups.items():
            paths = [p for p in table.pathways[i, members] if p is not None]
            if len(paths) >= 2:
                pm = mean_pairwise_distance(paths, max_pairs=max_pairs, seed=seed)  # character form
                rows.append((int(step), name, "pathway_distance", pm.mean, pm.stderr, len(paths)))
            for metric, values in (
                ("pathway_consistency", table.consistency[i, members]),
                ("pathway_consistency_normalized", table.consistency_normalized[i, members]),
                ("sample_loss", table.loss[i, members]),
            ):
                mean, stderr, n = _mean_stderr(values)
                if n:
                    rows.append((int(step), name, metric, mean, stderr, n))
    return pd.DataFrame(rows, columns=["step", "group", "metric", "value", "stderr", "n"])


def memorised_fraction(table: MemorisationTable) -> pd.DataFrame:
    """Per checkpoint, the share of samples memorised by then (columns step, value, n)."""
    first = table.first_step
    n = len(first)
    share = [float(((first != NEVER) & (first <= s)).sum()) / n for s in table.steps]
    return pd.DataFrame({"step": table.steps, "value": share, "n": n})


def _mean_stderr(values: np.ndarray) -> tuple[float, float | None, int]:
    vals = np.asarray(values, dtype=np.float64)
    vals = vals[np.isfinite(vals)]
    if not len(vals):
        return math.nan, None, 0
    stderr = float(vals.std(ddof=1) / math.sqrt(len(vals))) if len(vals) > 1 else None
    return float(vals.mean()), stderr, len(vals)


def _as_dict(record: dict | str | None) -> dict:
    if isinstance(record, dict):
        return record
    if isinstance(record, str):
        import json

        return json.loads(record)
    return {}


def _num(x: float | None) -> float:
    return math.nan if x is None else float(x)


def _natural(text: str) -> tuple[int, int, str]:
    return (0, int(text), "") if text.isdigit() else (1, 0, text)


def load_memorisation(store: Store, run: str, domain: str = "train", **kwargs: float) -> MemorisationTable:
    """The memorisation table of one run and probe domain from the cache (one parameter set: the most complete)."""
    rows = store.sample_results(run, f"{domain}/sample_loss")
    if rows.empty:
        raise ValueError(
            f"no per-sample rows for run {run!r}, domain {domain!r}; "
            f"compute them with `python -m analysis eval --run {run} --metrics memorisation`"
        )
    best = rows.groupby("params_hash")["step"].nunique().sort_values(kind="stable").index[-1]
    return memorisation_table(rows[rows["params_hash"] == best], **kwargs)
