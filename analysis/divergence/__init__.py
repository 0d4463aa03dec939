"""Where pretraining loss stops predicting downstream ability: the statistics behind the Divergence page.

Every function takes the long table the store hands out (run, step, tokens, metric, value[, stderr]) or
the aligned frame ``align`` returns, and gives back a plain data frame. Conventions shared by all of them:

- **Checkpoint-level points.** Two series are compared at the x positions of the second ("right") series,
  which is the sparse one (downstream scores at checkpoints); the first ("left") series, often logged every
  step, is interpolated there, on log-x by default because checkpoints are usually log-spaced. Nothing is
  extrapolated: right-series points outside the left series' x range are left out.
- **Directions.** Every metric is oriented by :func:`analysis.directions.higher_is_better` (declared by its
  producer, registered, or read from its name): "improves" means "moves the better way".
- **One setting per series.** A series is a metric under one setting: a frame that holds one metric under
  two parameter sets (``params_hash``) is refused with a one-line error; pick one first with
  :func:`analysis.settings.select_settings`. Estimates that did not converge (``converged`` False) are left
  out unless ``include_unconverged``.
- **Missing values.** Rows whose value or x is missing are dropped before anything is computed; a missing
  stderr stays missing (``divergence_windows`` then estimates one from the series).
- **Claims carry their error rate.** Windows, change correlations and "beats the loss" are tested by the
  procedures of :mod:`analysis.significance`, whose false-positive rates and coverage are checked by
  simulation (tests/test_significance.py, ``python -m bench.calibration``).
- **Too few points** give an empty frame with the documented columns, never an exception.
- **Bad input** (an unknown metric, run or axis) raises a one-line ``ValueError`` saying what is available.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from numbers import Integral

import numpy as np
import pandas as pd
from scipy.optimize import isotonic_regression

from analysis import significance as sig
from analysis.directions import orientation
from analysis.divergence.alignment import add_flops, align, finite_pairs
from analysis.divergence.correlation import CORRELATION_NOTE, correlations, pearson, rankdata, spearman
from analysis.divergence.frames import (
    ALIGNED_COLUMNS,
    CORRELATION_COLUMNS,
    MATCHED_COLUMNS,
    POOLED,
    RANKING_COLUMNS,
    RESIDUAL_COLUMNS,
    WINDOW_COLUMNS,
    X_AXES,
    available,
    check_frame,
    check_metric,
    empty_frame,
)
from analysis.divergence.metric_roles import downstream_metrics, loss_metrics, signal_metrics
from analysis.divergence.windows import (
    TOL_OF,
    divergence_windows,
    flat_tolerance,
    scatter_stderr,
    window_sentences,
    windows_caption,
)

# -- matched loss -------------------------------------------------------------------------------------------


def _monotone_curve(group: pd.DataFrame) -> pd.DataFrame:
    """The checkpoints that set a new lowest loss, in training order: loss strictly falls along them."""
    group = finite_pairs(group).sort_values("x")
    loss = group["left"].to_numpy(dtype=float)
    best_before = np.r_[np.inf, np.minimum.accumulate(loss)[:-1]]
    return group[loss < best_before]


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
    present = list(dict.fromkeys(points["run"]))
    if runs is None:
        runs = sorted(present)
    else:
        runs = [runs] if isinstance(runs, str) else list(runs)
        if not runs:
            raise ValueError("runs is empty: name at least one run")
        known = set(frame["run"].astype(str).unique())
        for run in runs:
            if run not in known:
                raise ValueError(f"run {run!r} not in the data; available: {available(known)}")
    if isinstance(levels, Integral) and levels < 1:
        raise ValueError(f"levels={levels}: ask for at least one loss level")
    curves = {run: _monotone_curve(points[points["run"] == run]) for run in runs}
    if not runs or any(c.empty for c in curves.values()):
        return empty_frame(MATCHED_COLUMNS)
    lo = max(float(c["left"].min()) for c in curves.values())
    hi = min(float(c["left"].max()) for c in curves.values())
    if lo > hi:
        return empty_frame(MATCHED_COLUMNS)
    if levels is None or isinstance(levels, Integral):
        grid = np.linspace(hi, lo, 8 if levels is None else int(levels))
    else:
        grid = np.asarray(list(levels), dtype=float)
        slack = 1e-9 * max(1.0, abs(hi))
        outside = grid[(grid < lo - slack) | (grid > hi + slack) | ~np.isfinite(grid)]
        if len(outside):
            raise ValueError(f"loss level {outside[0]:g} is outside the common loss range [{lo:.6g}, {hi:.6g}]")
        grid = np.clip(np.sort(grid)[::-1], lo, hi)
    values = {}
    for run, curve in curves.items():
        loss = curve["left"].to_numpy(dtype=float)[::-1]  # increasing, as np.interp wants
        score = np.interp(grid, loss, curve["right"].to_numpy(dtype=float)[::-1])
        se = np.interp(grid, loss, curve["right_stderr"].to_numpy(dtype=float)[::-1])
        values[run] = (score, se)
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


# -- residuals ----------------------------------------------------------------------------------------------


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


# -- predictor ranking --------------------------------------------------------------------------------------


def pava(y: Sequence[float] | np.ndarray, weights: Sequence[float] | np.ndarray | None = None) -> np.ndarray:
    """Pool-adjacent-violators: the non-decreasing sequence closest to ``y`` in weighted least squares.

    ``[1, 3, 2, 4] -> [1, 2.5, 2.5, 4]``: each violating neighbour pair is replaced by its weighted mean,
    repeatedly, until the sequence no longer decreases anywhere.
    """
    y = np.asarray(y, dtype=float)
    w = np.ones_like(y) if weights is None else np.asarray(weights, dtype=float)
    means: list[float] = []
    sizes: list[float] = []
    counts: list[int] = []
    for value, weight in zip(y, w, strict=True):
        means.append(float(value))
        sizes.append(float(weight))
        counts.append(1)
        while len(means) > 1 and means[-2] > means[-1]:
            total = sizes[-2] + sizes[-1]
            merged = (means[-2] * sizes[-2] + means[-1] * sizes[-1]) / total
            count = counts[-2] + counts[-1]
            del means[-1], sizes[-1], counts[-1]
            means[-1], sizes[-1], counts[-1] = merged, total, count
    return np.repeat(means, counts)


def isotonic_fit(
    x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray, *, increasing: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Monotone least-squares fit of y on x: returns the distinct x values (sorted) and the fit at each.

    Points with equal x are first averaged (weighted by their count), then the pool-adjacent-violators fit
    runs on the sorted means (scipy's, in C; :func:`pava` is the readable reference the tests compare it
    with); ``increasing=False`` fits a non-increasing function. Predict elsewhere with ``np.interp``.
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"isotonic_fit needs two equal, non-empty series (got {len(x)} and {len(y)})")
    ux, inverse = np.unique(x, return_inverse=True)
    counts = np.bincount(inverse).astype(float)
    means = np.bincount(inverse, weights=y) / counts
    return ux, isotonic_regression(means, weights=counts, increasing=increasing).x


def _loo_errors(x: np.ndarray, y: np.ndarray, held_out: np.ndarray | None = None) -> np.ndarray:
    """Leave-one-out errors of a monotone fit of y on x, the direction chosen without the held-out point.

    Each point in ``held_out`` (default: all) is predicted by the isotonic fit on all the others, increasing
    or decreasing as Spearman's rho of those others says, so the held-out point never picks its own
    direction. Returns y - prediction at each held-out point.
    """
    n = len(x)
    held_out = np.arange(n) if held_out is None else held_out
    errors = np.empty(len(held_out))
    mask = np.ones(n, dtype=bool)
    for k, i in enumerate(held_out):
        mask[i] = False
        xs, ys = x[mask], y[mask]
        rho = spearman(xs, ys)
        ux, fit = isotonic_fit(xs, ys, increasing=not (np.isfinite(rho) and rho < 0))
        errors[k] = y[i] - np.interp(x[i], ux, fit)
        mask[i] = True
    return errors


def _held_out(n: int, max_held_out: int) -> np.ndarray:
    """Every index, or ``max_held_out`` evenly spaced ones (bounds the cost at that many fits)."""
    if n <= max_held_out:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, max_held_out).round()).astype(int)


def _r2(errors: np.ndarray, y: np.ndarray, held_out: np.ndarray) -> float:
    """1 - SSE / SSE of predicting each held-out point by the mean of the others."""
    loo_mean = (y.sum() - y[held_out]) / (len(y) - 1)
    baseline = float(((y[held_out] - loo_mean) ** 2).sum())
    return 1.0 - float((errors**2).sum()) / baseline if baseline > 0 else float("nan")


def _rank_one(run: str, predictor: str, downstream: str, points: pd.DataFrame, is_loss: bool) -> dict:
    a = points["left"].to_numpy(dtype=float)
    b = points["right"].to_numpy(dtype=float)
    rho = spearman(a, b)
    held = _held_out(len(a), 200)
    errors = _loo_errors(a, b, held)
    return {
        "run": run,
        "predictor": predictor,
        "downstream": downstream,
        "n": len(a),
        "spearman": rho,
        "abs_spearman": abs(rho),
        "sign": 0 if not np.isfinite(rho) or rho == 0 else int(np.sign(rho)),
        "loo_rmse": float(np.sqrt(np.mean(errors**2))),
        "loo_r2": _r2(errors, b, held),
        "is_loss": is_loss,
    }


def _versus_loss(aligned: dict[str, pd.DataFrame], loss_metric: str, names: list[str], n_sim: int) -> dict:
    """Holm-adjusted p-values that each candidate's out-of-sample error is below the loss's.

    Each candidate is compared with the loss on the checkpoints both have, the loss's leave-one-out errors
    recomputed on exactly those (:func:`analysis.significance.beats_baseline`), then the p-values are
    adjusted by Holm's step-down for the number of candidates tried. Returns {candidate: p_adjusted}.
    """
    key = ["run", "x"]
    loss_points = aligned[loss_metric][[*key, "left", "right"]].rename(columns={"left": "loss"})
    raw, baselines = {}, {}
    for name in names:
        shared = loss_points.merge(aligned[name][[*key, "left"]], on=key).sort_values(key, ignore_index=True)
        if len(shared) < 4:
            continue
        y = shared["right"].to_numpy(dtype=float)
        points = tuple(zip(shared["run"], shared["x"], strict=True))  # candidates on the same points share it
        if points not in baselines:
            baselines[points] = _loo_errors(shared["loss"].to_numpy(dtype=float), y) ** 2
        base = baselines[points]
        errors = _loo_errors(shared["left"].to_numpy(dtype=float), y) ** 2
        raw[name] = float(sig.beats_baseline(errors[None, :], base, shared["run"].to_numpy(), n_sim=n_sim)[0])
    return dict(zip(raw, sig.holm(list(raw.values())), strict=True))


def predictor_ranking(
    frame: pd.DataFrame,
    downstream_metric: str,
    *,
    candidates: Sequence[str] | None = None,
    loss_metric: str | None = None,
    per_run: bool = False,
    min_points: int = 4,
    alpha: float = 0.05,
    x: str = "step",
    n_params: int | float | Mapping[str, float] | None = None,
    log_interp: bool = True,
    n_sim: int = 4000,
) -> pd.DataFrame:
    """How well each signal predicts the downstream score out of sample, best first, and whether it beats
    the loss.

    Each candidate is aligned to the downstream checkpoints (``align``: interpolated at the checkpoints'
    x, never extrapolated) and checkpoints of all runs are pooled (``run`` = ``"(pooled)"``); with
    ``per_run`` each run is also scored alone, in rows after the pooled ones. Per candidate: ``spearman``
    (signed, descriptive) and ``abs_spearman``, ``sign`` (+1: higher signal, higher score), and the
    leave-one-out error of a monotone (isotonic) fit whose direction is chosen inside each fold, without the
    held-out point: ``loo_rmse`` and ``loo_r2`` = 1 - SSE / SSE of predicting each point by the mean of the
    others (above 200 points, 200 evenly spaced points are held out). With ``loss_metric``, the loss is
    scored too (``is_loss``) and every other candidate is tested against it on the checkpoints all of them
    share: ``beats_loss_p`` is the probability, adjusted for the number of candidates, of an advantage this
    large in out-of-sample squared error if the candidate were no better than the loss
    (:func:`analysis.significance.beats_baseline`); ``beats_loss`` is ``beats_loss_p <= alpha``. With few
    checkpoints nothing can beat the loss, and the column says so. Unconverged estimates are left out.
    ``candidates=None`` takes every other metric except lm-eval scores and schedule bookkeeping.
    Sorted by loo_r2 (best first), then abs_spearman.

    Columns: run, predictor, downstream, n, spearman, abs_spearman, sign, loo_rmse, loo_r2, is_loss,
    beats_loss_p, beats_loss.
    """
    check_frame(frame)
    check_metric(frame, downstream_metric)
    if min_points < 4:
        raise ValueError(f"min_points={min_points}: leave-one-out with a chosen direction needs at least 4 points")
    if candidates is None:
        names = signal_metrics(frame["metric"].astype(str).unique(), downstream_metric)
    else:
        names = [candidates] if isinstance(candidates, str) else list(candidates)
        for name in names:
            check_metric(frame, name)
    if loss_metric is not None:
        check_metric(frame, loss_metric)
        if loss_metric not in names:
            names.append(loss_metric)
    rows, run_rows, aligned = [], [], {}
    for name in names:
        if name == downstream_metric:
            continue
        points = finite_pairs(align(frame, name, downstream_metric, x=x, n_params=n_params, log_interp=log_interp))
        if len(points) >= min_points:
            aligned[name] = points
            rows.append(_rank_one(POOLED, name, downstream_metric, points, name == loss_metric))
        if per_run:
            for run, group in points.groupby("run", sort=True):
                if len(group) >= min_points:
                    run_rows.append(_rank_one(run, name, downstream_metric, group, name == loss_metric))
    if not rows and not run_rows:
        return empty_frame(RANKING_COLUMNS)
    tested = {}
    if loss_metric in aligned:
        others = [r["predictor"] for r in rows if not r["is_loss"]]
        tested = _versus_loss(aligned, loss_metric, others, n_sim) if others else {}
    for row in rows:
        p = tested.get(row["predictor"], float("nan"))
        row["beats_loss_p"] = p
        row["beats_loss"] = bool(p <= alpha) if np.isfinite(p) else False
    parts = []
    for chunk, keys in ((rows, ["loo_r2", "abs_spearman"]), (run_rows, ["run", "loo_r2", "abs_spearman"])):
        if chunk:
            ascending = [True, False, False] if len(keys) == 3 else [False, False]
            parts.append(pd.DataFrame(chunk).sort_values(keys, ascending=ascending, na_position="last"))
    out = pd.concat(parts, ignore_index=True).reindex(columns=RANKING_COLUMNS)
    out["beats_loss"] = out["beats_loss"].fillna(False).astype(bool)
    out.attrs["alpha"] = alpha
    return out


# --- what the views say about the results ----------------------------------------------------------


def better_sign(result: pd.DataFrame, what: str) -> str:
    """Which sign of a gap or residual is the good one, e.g. "(positive: better than the reference)".

    ``result`` is ``matched_loss`` or ``residuals`` output, which keeps the score's direction in its attrs.
    """
    return f"({'positive' if result.attrs.get('higher_is_better', True) else 'negative'}: better than {what})"


def ranking_verdict(ranking: pd.DataFrame, loss_metric: str | None) -> str:
    """One plain sentence: which signals beat the loss out of sample, or that none does."""
    pooled = ranking[ranking["run"] == POOLED] if len(ranking) else ranking
    if loss_metric is None or not len(pooled) or not pooled["is_loss"].any():
        return "No loss to compare with: the ranking orders signals by out-of-sample fit only."
    alpha = ranking.attrs.get("alpha", 0.05)
    winners = pooled[pooled["beats_loss"].astype(bool)]
    if len(winners):
        named = ", ".join(f"{r.predictor} (p = {r.beats_loss_p:.3g})" for r in winners.itertuples())
        return f"Predicts {pooled.iloc[0]['downstream']} better than {loss_metric} out of sample: {named}."
    tested = pooled["beats_loss_p"].notna().sum()
    if tested == 0:
        return f"No signal shares enough checkpoints with {loss_metric} to be compared with it."
    return (
        f"No signal predicts {pooled.iloc[0]['downstream']} better than {loss_metric} out of sample "
        f"({tested} tested, α = {alpha:g}, adjusted for the number tried)."
    )


# --- choosing sensible defaults for the views -------------------------------------------------------

__all__ = [
    "ALIGNED_COLUMNS",
    "CORRELATION_COLUMNS",
    "CORRELATION_NOTE",
    "MATCHED_COLUMNS",
    "POOLED",
    "RANKING_COLUMNS",
    "RESIDUAL_COLUMNS",
    "TOL_OF",
    "WINDOW_COLUMNS",
    "X_AXES",
    "add_flops",
    "align",
    "better_sign",
    "correlations",
    "divergence_windows",
    "downstream_metrics",
    "flat_tolerance",
    "isotonic_fit",
    "last_residuals",
    "loss_metrics",
    "matched_loss",
    "pava",
    "pearson",
    "predictor_ranking",
    "rankdata",
    "ranking_verdict",
    "residuals",
    "scatter_stderr",
    "signal_metrics",
    "spearman",
    "window_sentences",
    "windows_caption",
]
