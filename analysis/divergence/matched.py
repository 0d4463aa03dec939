"""Downstream scores compared at equal loss: matched-loss gaps between runs and residuals on a loss line.

:func:`matched_loss` reads each run's score where training first reached common loss levels and its gap
to a reference run; :func:`residuals` subtracts what a straight line on loss predicts. Both keep the
score's direction in their attrs, which :func:`better_sign` turns into words.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from numbers import Integral

import numpy as np
import pandas as pd

from analysis.directions import orientation
from analysis.divergence.alignment import align, finite_pairs
from analysis.divergence.frames import MATCHED_COLUMNS, RESIDUAL_COLUMNS, available, empty_frame


def _monotone_curve(group: pd.DataFrame) -> pd.DataFrame:
    """The checkpoints that set a new lowest loss, in training order: loss strictly falls along them."""
    group = finite_pairs(group).sort_values("x")
    loss = group["left"].to_numpy(dtype=float)
    best_before = np.r_[np.inf, np.minimum.accumulate(loss)[:-1]]
    return group[loss < best_before]


def _chosen_runs(frame: pd.DataFrame, points: pd.DataFrame, runs: str | Sequence[str] | None) -> list[str]:
    """The runs to compare, the reference first: those named (each must be in ``frame``) or, for None, every
    run of the aligned ``points`` in sorted order."""
    if runs is None:
        return sorted(dict.fromkeys(points["run"]))
    chosen = [runs] if isinstance(runs, str) else list(runs)
    if not chosen:
        raise ValueError("runs is empty: name at least one run")
    known = set(frame["run"].astype(str).unique())
    for run in chosen:
        if run not in known:
            raise ValueError(f"run {run!r} not in the data; available: {available(known)}")
    return chosen


def _loss_grid(curves: dict[str, pd.DataFrame], levels: int | Sequence[float] | None) -> np.ndarray | None:
    """The loss levels to read every run at, highest first, inside every run's loss range (None when the
    ranges do not overlap): 8 evenly spaced for None, that many for an int, or exactly the levels given."""
    lo = max(float(c["left"].min()) for c in curves.values())
    hi = min(float(c["left"].max()) for c in curves.values())
    if lo > hi:
        return None
    if levels is None or isinstance(levels, (int, Integral)):
        return np.linspace(hi, lo, 8 if levels is None else int(levels))
    grid = np.asarray(list(levels), dtype=float)
    # A level given at the range's edge may miss it by rounding: allow that much before refusing it.
    slack = 1e-9 * max(1.0, abs(hi))
    outside = grid[(grid < lo - slack) | (grid > hi + slack) | ~np.isfinite(grid)]
    if len(outside):
        raise ValueError(f"loss level {outside[0]:g} is outside the common loss range [{lo:.6g}, {hi:.6g}]")
    return np.clip(np.sort(grid)[::-1], lo, hi)


def _score_at_levels(curve: pd.DataFrame, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A run's score and its stderr at each loss level, interpolated linearly in loss along its record curve."""
    loss = curve["left"].to_numpy(dtype=float)[::-1]  # increasing, as np.interp wants
    score = np.interp(grid, loss, curve["right"].to_numpy(dtype=float)[::-1])
    se = np.interp(grid, loss, curve["right_stderr"].to_numpy(dtype=float)[::-1])
    return score, se


def matched_loss(
    frame: pd.DataFrame,
    loss_metric: str,
    downstream_metric: str,
    runs: Sequence[str] | None = None,
    *,
    levels: int | Sequence[float] | None = None,
    x: str = "step",
    n_params: int | float | Mapping[str, float] | None = None,
    log_interp: bool = True,
) -> pd.DataFrame:
    """Each run's downstream score at common loss levels, and its gap to the reference run (``runs[0]``).

    Loss is made monotone by keeping, in training order, only the checkpoints that set a new lowest loss
    (the running minimum): the score at level L is then the score when training *first* reached L, linearly
    interpolated in loss between the two record checkpoints around L; later checkpoints that only revisit a
    loss already reached (spikes, plateaus) are ignored. The stderr is interpolated linearly the same way.
    Levels lie inside every run's loss range, so nothing is extrapolated: ``levels=None`` gives 8 evenly
    spaced levels, an int that many, a sequence exactly those (each must be inside the common range).
    ``runs=None`` takes every run with both metrics, in sorted order.

    Columns: loss_level, run, downstream, stderr, reference, gap (score - reference score), gap_stderr
    (sqrt of the summed squared stderrs; 0 for the reference itself). Sorted by falling loss, then run order.
    """
    points = align(frame, loss_metric, downstream_metric, x=x, n_params=n_params, log_interp=log_interp)
    runs = _chosen_runs(frame, points, runs)
    if isinstance(levels, (int, Integral)) and levels < 1:
        raise ValueError(f"levels={levels}: ask for at least one loss level")
    curves = {run: _monotone_curve(points[points["run"] == run]) for run in runs}
    if not runs or any(c.empty for c in curves.values()):
        return empty_frame(MATCHED_COLUMNS)
    grid = _loss_grid(curves, levels)
    if grid is None:
        return empty_frame(MATCHED_COLUMNS)
    values = {run: _score_at_levels(curve, grid) for run, curve in curves.items()}
    reference = runs[0]
    ref_score, ref_se = values[reference]
    pieces = []
    for run in runs:
        score, se = values[run]
        gap_se = np.zeros_like(se) if run == reference else np.sqrt(se**2 + ref_se**2)
        pieces.append(
            pd.DataFrame(
                {
                    "loss_level": grid,
                    "run": run,
                    "downstream": score,
                    "stderr": se,
                    "reference": reference,
                    "gap": score - ref_score,
                    "gap_stderr": gap_se,
                    "_order": np.arange(len(grid)) * len(runs) + runs.index(run),
                }
            )
        )
    out = pd.concat(pieces, ignore_index=True).sort_values("_order", ignore_index=True)[MATCHED_COLUMNS]
    out.attrs["higher_is_better"] = orientation(downstream_metric, frame) > 0
    return out


def _linear_fit(loss: np.ndarray, score: np.ndarray) -> tuple[float, float]:
    """Least-squares (intercept, slope) of score on loss; NaNs when loss takes fewer than two values."""
    if len(loss) < 2 or np.ptp(loss) == 0:
        return float("nan"), float("nan")
    slope, intercept = np.polyfit(loss, score, 1)
    return float(intercept), float(slope)


def residuals(
    frame: pd.DataFrame,
    loss_metric: str,
    downstream_metric: str,
    *,
    x: str = "step",
    n_params: int | float | Mapping[str, float] | None = None,
    log_interp: bool = True,
) -> pd.DataFrame:
    """Downstream score minus what a straight line on loss predicts, per checkpoint.

    The line is fitted by least squares on every checkpoint of every run pooled (``intercept``, ``slope``,
    ``fitted``, ``residual``) and, separately, on each run alone (``run_*``; NaN when the run's loss takes
    fewer than two values). A positive pooled residual means the run is better downstream than its loss
    says. Empty when the pooled loss takes fewer than two values.

    Columns: run, x, step, tokens, loss, downstream, fitted, residual, intercept, slope,
    run_fitted, run_residual, run_intercept, run_slope.
    """
    points = finite_pairs(align(frame, loss_metric, downstream_metric, x=x, n_params=n_params, log_interp=log_interp))
    loss = points["left"].to_numpy(dtype=float)
    score = points["right"].to_numpy(dtype=float)
    intercept, slope = _linear_fit(loss, score)
    if not np.isfinite(slope):
        return empty_frame(RESIDUAL_COLUMNS)
    out = pd.DataFrame(
        {
            "run": points["run"].to_numpy(),
            "x": points["x"].to_numpy(dtype=float),
            "step": points["step"].to_numpy(dtype=float),
            "tokens": points["tokens"].to_numpy(dtype=float),
            "loss": loss,
            "downstream": score,
        }
    )
    out["fitted"] = intercept + slope * loss
    out["residual"] = score - out["fitted"]
    out["intercept"] = intercept
    out["slope"] = slope
    for column in ("run_fitted", "run_residual", "run_intercept", "run_slope"):
        out[column] = np.nan
    for run in out["run"].unique():
        mask = (out["run"] == run).to_numpy()
        a, b = _linear_fit(loss[mask], score[mask])
        out.loc[mask, "run_intercept"] = a
        out.loc[mask, "run_slope"] = b
        out.loc[mask, "run_fitted"] = a + b * loss[mask]
        out.loc[mask, "run_residual"] = score[mask] - (a + b * loss[mask])
    out = out[RESIDUAL_COLUMNS]
    out.attrs["higher_is_better"] = orientation(downstream_metric, frame) > 0
    return out


def last_residuals(residual: pd.DataFrame) -> pd.Series:
    """Each run's pooled ``residual`` (from ``residuals``) at its last checkpoint, indexed by run."""
    return residual.sort_values("x").groupby("run").tail(1).set_index("run")["residual"]


def better_sign(result: pd.DataFrame, what: str) -> str:
    """Which sign of a gap or residual is the good one, e.g. "(positive: better than the reference)".

    ``result`` is ``matched_loss`` or ``residuals`` output, which keeps the score's direction in its attrs.
    """
    return f"({'positive' if result.attrs.get('higher_is_better', True) else 'negative'}: better than {what})"
