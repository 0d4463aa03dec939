"""Rank correlation of loss and downstream scores across checkpoints, on levels and on changes.

Levels are described (Spearman, Pearson) without an interval, because two trends correlate whether or not
they are related; the inference is on the changes from one checkpoint to the next
(:func:`analysis.significance.change_correlation`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from analysis import significance as sig
from analysis.divergence.alignment import aligned_for, finite_pairs
from analysis.divergence.frames import CORRELATION_COLUMNS, empty_frame


def rankdata(values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given the average of the ranks they span (``[10, 20, 20, 30] -> [1, 2.5, 2.5, 4]``)."""
    a = np.asarray(values, dtype=float)
    order = np.argsort(a, kind="mergesort")
    sorted_a = a[order]
    # Each run of equal values [i, j) gets the mean of ranks i+1 .. j.
    starts = np.flatnonzero(np.r_[True, sorted_a[1:] != sorted_a[:-1]])
    ends = np.r_[starts[1:], len(a)]
    avg = (starts + ends + 1) / 2.0
    ranks = np.empty(len(a))
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def pearson(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """Pearson's r; NaN when either series is constant or has fewer than two points."""
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    if len(a) != len(b):
        raise ValueError(f"series lengths differ ({len(a)} vs {len(b)})")
    if len(a) < 2:
        return float("nan")
    da, db = a - a.mean(), b - b.mean()
    va, vb = float(da @ da), float(db @ db)
    if va <= 0 or vb <= 0 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(np.clip((da @ db) / np.sqrt(va * vb), -1.0, 1.0))


def spearman(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """Spearman's rho: Pearson's r of the average ranks (so ties are handled); NaN for constant series."""
    return pearson(rankdata(a), rankdata(b))


def correlations(
    aligned_or_frame: pd.DataFrame,
    loss_metric: str,
    downstream_metrics: str | Sequence[str],
    *,
    window: tuple[float, float] | None = None,
    x: str = "step",
    n_params: int | float | Mapping[str, float] | None = None,
    log_interp: bool = True,
    min_points: int = 3,
    level: float = 0.95,
) -> pd.DataFrame:
    """Correlation of loss and each downstream score across a run's checkpoints, levels and changes.

    Takes the long table or the output of ``align`` (several concatenated also work). ``window=(lo, hi)``
    keeps checkpoints with lo <= x <= hi; runs with fewer than ``min_points`` checkpoints are left out.

    ``spearman`` and ``pearson`` describe the levels. They carry no interval on purpose: two series that
    both trend with training correlate whether or not they are related (a random-walk score against a
    falling loss gives |rho| near 1 half the time), and resampling checkpoints cannot tell. The inference is
    on the *changes* from one checkpoint to the next: ``change_spearman`` with a ``level`` interval
    (``change_lo``, ``change_hi``) and a two-sided ``change_p`` against "the score's changes are unrelated
    to the loss's" (:func:`analysis.significance.change_correlation`; NaN with fewer than about 5
    checkpoints). ``n_effective`` is the number of independent changes the interval is worth.

    Columns: run, downstream, n, spearman, change_spearman, change_lo, change_hi, change_p, pearson,
    n_effective.
    """
    metrics = [downstream_metrics] if isinstance(downstream_metrics, str) else list(downstream_metrics)
    if not metrics:
        raise ValueError("downstream_metrics is empty: name at least one downstream metric")
    if min_points < 3:
        raise ValueError(f"min_points={min_points}: a correlation needs at least 3 points")
    if not 0 < level < 1:
        raise ValueError(f"level={level} must be between 0 and 1")
    if window is not None:
        lo, hi = window
        if not lo <= hi:
            raise ValueError(f"window {window}: give (lo, hi) with lo <= hi")
    points = aligned_for(aligned_or_frame, loss_metric, metrics, x=x, n_params=n_params, log_interp=log_interp)
    rows = []
    for (run, metric), group in points.groupby(["run", "right_metric"], sort=True):
        group = finite_pairs(group).sort_values("x")
        if window is not None:
            group = group[(group["x"] >= window[0]) & (group["x"] <= window[1])]
        if len(group) < min_points:
            continue
        a = group["left"].to_numpy(dtype=float)
        b = group["right"].to_numpy(dtype=float)
        change = sig.change_correlation(a, b, level=level)
        rows.append(
            {
                "run": run,
                "downstream": metric,
                "n": len(a),
                "spearman": spearman(a, b),
                "pearson": pearson(a, b),
                "change_spearman": change.rho,
                "change_lo": change.lo,
                "change_hi": change.hi,
                "change_p": change.p_value,
                "n_effective": change.n_effective,
            }
        )
    if not rows:
        return empty_frame(CORRELATION_COLUMNS)
    out = pd.DataFrame(rows).reindex(columns=CORRELATION_COLUMNS)
    out.attrs["level"] = level
    return out


# What the views print under a correlation table.
CORRELATION_NOTE = (
    "spearman and pearson describe the levels (two trends correlate whether or not they are related, so "
    "they carry no interval). change_spearman correlates the changes from checkpoint to checkpoint; its 95% "
    "interval (change_lo, change_hi) and p-value account for the autocorrelation left in the changes."
)
