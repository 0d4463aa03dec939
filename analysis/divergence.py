"""Where pretraining loss stops predicting downstream ability: the statistics behind the Divergence page.

Every function takes the long table the store hands out (run, step, tokens, metric, value[, stderr]) or
the aligned frame ``align`` returns, and gives back a plain data frame. Conventions shared by all of them:

- **Checkpoint-level points.** Two series are compared at the x positions of the second ("right") series,
  which is the sparse one (downstream scores at checkpoints); the first ("left") series, often logged every
  step, is interpolated there, on log-x by default because checkpoints are usually log-spaced. Nothing is
  extrapolated: right-series points outside the left series' x range are left out.
- **Loss is lower-is-better, downstream higher-is-better.**
- **Missing values.** Rows whose value or x is missing are dropped before anything is computed; a missing
  stderr stays missing (and counts as 0 where a test needs a number, see ``divergence_windows``).
  Duplicate rows for one (run, metric, x), e.g. the same metric cached under two parameter sets, are averaged.
- **Too few points** give an empty frame with the documented columns, never an exception.
- **Bad input** (an unknown metric, run or axis) raises a one-line ``ValueError`` saying what is available.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from numbers import Integral

import numpy as np
import pandas as pd

X_AXES = ("step", "tokens", "flops")
POOLED = "(pooled)"

ALIGNED_COLUMNS = [
    "run", "x", "step", "tokens", "left_metric", "right_metric", "left", "left_stderr", "right", "right_stderr",
]  # fmt: skip
CORRELATION_COLUMNS = [
    "run", "downstream", "n", "spearman", "spearman_lo", "spearman_hi", "pearson", "pearson_lo", "pearson_hi",
]  # fmt: skip
WINDOW_COLUMNS = [
    "run", "kind", "start", "end", "n_points", "loss_change", "loss_range", "downstream_change", "z_score",
    "stderr_source",
]  # fmt: skip
MATCHED_COLUMNS = ["loss_level", "run", "downstream", "stderr", "reference", "gap", "gap_stderr"]
RESIDUAL_COLUMNS = [
    "run", "x", "step", "tokens", "loss", "downstream", "fitted", "residual", "intercept", "slope",
    "run_fitted", "run_residual", "run_intercept", "run_slope",
]  # fmt: skip
RANKING_COLUMNS = [
    "run", "predictor", "downstream", "n", "spearman", "abs_spearman", "sign", "loo_rmse", "loo_r2", "is_loss",
]  # fmt: skip

# Logged bookkeeping that is not a signal about the model (the schedule predicts everything monotone).
_NOT_SIGNALS = {"lr", "learning_rate", "epoch", "step", "tokens", "samples", "global_step", "runtime", "time"}


# -- input handling -----------------------------------------------------------------------------------------


_TEXT_COLUMNS = {"run", "kind", "predictor", "downstream", "left_metric", "right_metric", "reference"}


def _empty(columns: list[str]) -> pd.DataFrame:
    """A frame with no rows and the given columns (text columns as object, the rest as float)."""
    return pd.DataFrame({c: pd.Series(dtype=object if c in _TEXT_COLUMNS else float) for c in columns})


def _available(names) -> str:
    names = sorted({str(n) for n in names})
    shown = ", ".join(names[:30])
    return shown + (f", ... ({len(names)} in all)" if len(names) > 30 else "") if names else "(none)"


def _check_frame(frame: pd.DataFrame) -> None:
    if not isinstance(frame, pd.DataFrame):
        raise ValueError(f"expected a pandas DataFrame, got {type(frame).__name__}")
    missing = [c for c in ("run", "step", "metric", "value") if c not in frame.columns]
    if missing:
        raise ValueError(
            f"frame lacks column(s) {', '.join(missing)}: pass the long table "
            "(run, step, tokens, metric, value, stderr)"
        )


def _check_metric(frame: pd.DataFrame, metric: str) -> None:
    if not (frame["metric"] == metric).any():
        raise ValueError(f"metric {metric!r} not in the data; available: {_available(frame['metric'].unique())}")


def _check_x(x: str) -> None:
    if x not in X_AXES:
        raise ValueError(f"x-axis {x!r}: choose one of {', '.join(X_AXES)}")


def add_flops(frame: pd.DataFrame, n_params: int | float | Mapping[str, float]) -> pd.DataFrame:
    """A copy of ``frame`` with a ``flops`` column: 6 * n_params * tokens (the dense-transformer estimate).

    ``n_params`` is one count for every run or a run -> count mapping that must name every run in the frame.
    Rows with unknown tokens get no FLOPs (NaN).
    """
    _check_frame(frame)
    out = frame.copy()
    tokens = pd.to_numeric(out["tokens"], errors="coerce") if "tokens" in out else pd.Series(np.nan, index=out.index)
    if isinstance(n_params, Mapping):
        missing = sorted(set(out["run"].astype(str).unique()) - {str(k) for k in n_params})
        if missing:
            raise ValueError(f"n_params has no entry for run {missing[0]!r}: give every run's parameter count")
        counts = out["run"].astype(str).map({str(k): float(v) for k, v in n_params.items()})
    else:
        counts = pd.Series(float(n_params), index=out.index)
    if (counts <= 0).any():
        raise ValueError("n_params must be positive")
    out["flops"] = 6.0 * counts * tokens
    return out


def _prepare(
    frame: pd.DataFrame, metrics: Sequence[str], *, x: str, n_params: int | float | Mapping[str, float] | None
) -> pd.DataFrame:
    """Rows of ``metrics`` with numeric run/x/step/tokens/value/stderr, NaNs dropped, duplicates averaged."""
    _check_frame(frame)
    _check_x(x)
    for metric in metrics:
        _check_metric(frame, metric)
    data = frame[frame["metric"].astype(str).isin(list(metrics))].copy()
    if x == "flops":
        if n_params is not None:
            data = add_flops(data, n_params)
        elif "flops" not in data:
            raise ValueError("x='flops' needs n_params (the model's parameter count) or a flops column")
    for column in ("tokens", "stderr"):
        if column not in data:
            data[column] = np.nan
    data["run"] = data["run"].astype(str)
    data["metric"] = data["metric"].astype(str)
    for column in ("step", "tokens", "value", "stderr", *(("flops",) if x == "flops" else ())):
        data[column] = pd.to_numeric(data[column], errors="coerce").astype(float)
    data["x"] = data[x]
    data = data[np.isfinite(data["x"]) & np.isfinite(data["value"])]
    if data.empty:
        return pd.DataFrame(columns=["run", "metric", "x", "step", "tokens", "value", "stderr"])
    return data.groupby(["run", "metric", "x"], as_index=False, sort=True).agg(
        step=("step", "min"), tokens=("tokens", "min"), value=("value", "mean"), stderr=("stderr", "mean")
    )


def _interp(at: np.ndarray, xs: np.ndarray, ys: np.ndarray, log: bool) -> np.ndarray:
    """Linear interpolation of (xs, ys) at ``at`` (xs increasing), on log-x when asked and possible."""
    if log and xs[0] > 0 and (at > 0).all():
        return np.interp(np.log(at), np.log(xs), ys)
    return np.interp(at, xs, ys)


def align(
    frame: pd.DataFrame,
    left_metric: str,
    right_metric: str,
    *,
    x: str = "step",
    n_params: int | float | Mapping[str, float] | None = None,
    log_interp: bool = True,
) -> pd.DataFrame:
    """Two series of each run side by side at the right series' x positions.

    The left series (e.g. ``train/loss``, logged every step) is linearly interpolated at the x of every
    right-series point (e.g. a downstream score at a checkpoint), on log-x when ``log_interp`` and every x
    of the run is positive (checkpoints are usually log-spaced), on linear x otherwise. Right points outside
    the left series' x range are left out (no extrapolation). The left stderr is interpolated the same way.
    ``x`` is ``step``, ``tokens`` or ``flops`` (6 * n_params * tokens; ``n_params`` one count or per run).

    Columns: run, x, step, tokens, left_metric, right_metric, left, left_stderr, right, right_stderr.
    """
    data = _prepare(frame, [left_metric, right_metric], x=x, n_params=n_params)
    pieces = []
    for run, group in data.groupby("run", sort=True):
        left = group[group["metric"] == left_metric]
        right = group[group["metric"] == right_metric]
        if left.empty or right.empty:
            continue
        lx = left["x"].to_numpy()
        rx = right["x"].to_numpy()
        inside = (rx >= lx[0]) & (rx <= lx[-1])
        if not inside.any():
            continue
        right = right[inside]
        rx = rx[inside]
        lv = _interp(rx, lx, left["value"].to_numpy(), log_interp)
        ls = _interp(rx, lx, left["stderr"].to_numpy(), log_interp)
        pieces.append(
            pd.DataFrame(
                {
                    "run": run,
                    "x": rx,
                    "step": right["step"].to_numpy(),
                    "tokens": right["tokens"].to_numpy(),
                    "left_metric": left_metric,
                    "right_metric": right_metric,
                    "left": lv,
                    "left_stderr": ls,
                    "right": right["value"].to_numpy(),
                    "right_stderr": right["stderr"].to_numpy(),
                }
            )
        )
    out = pd.concat(pieces, ignore_index=True)[ALIGNED_COLUMNS] if pieces else _empty(ALIGNED_COLUMNS)
    out.attrs["x"] = x
    return out


def _aligned_for(
    data: pd.DataFrame,
    loss_metric: str,
    downstream_metrics: Sequence[str],
    *,
    x: str,
    n_params,
    log_interp: bool,
) -> pd.DataFrame:
    """Aligned (loss, downstream) points from either a long table or an ``align`` result."""
    if isinstance(data, pd.DataFrame) and {"left_metric", "right_metric", "left", "right"} <= set(data.columns):
        lefts = set(data["left_metric"].astype(str).unique())
        if loss_metric not in lefts:
            raise ValueError(f"metric {loss_metric!r} not in the data; available: {_available(lefts)}")
        rights = set(data["right_metric"].astype(str).unique())
        for metric in downstream_metrics:
            if metric not in rights:
                raise ValueError(f"metric {metric!r} not in the data; available: {_available(rights)}")
        keep = (data["left_metric"] == loss_metric) & data["right_metric"].isin(list(downstream_metrics))
        return data[keep]
    _check_frame(data)
    for metric in [loss_metric, *downstream_metrics]:
        _check_metric(data, metric)
    pieces = [align(data, loss_metric, m, x=x, n_params=n_params, log_interp=log_interp) for m in downstream_metrics]
    return pd.concat(pieces, ignore_index=True) if pieces else _empty(ALIGNED_COLUMNS)


def _finite_pairs(group: pd.DataFrame) -> pd.DataFrame:
    return group[np.isfinite(group["left"].astype(float)) & np.isfinite(group["right"].astype(float))]


# -- correlations -------------------------------------------------------------------------------------------


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


def _weighted_corr(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Row-wise weighted Pearson r of (x, y) with weights ``w`` (n_boot, n); x, y broadcast against w."""
    total = w.sum(axis=1, keepdims=True)
    mx = (w * x).sum(axis=1, keepdims=True) / total
    my = (w * y).sum(axis=1, keepdims=True) / total
    dx, dy = x - mx, y - my
    cov = (w * dx * dy).sum(axis=1)
    vx = (w * dx * dx).sum(axis=1)
    vy = (w * dy * dy).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.clip(cov / np.sqrt(vx * vy), -1.0, 1.0)


def _resample_ranks(values: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Average ranks of every original point inside each bootstrap resample given by ``counts``.

    A resample that holds point k c_k times is the multiset {values[k] x c_k}; the average rank of a value u
    in it is (number of resampled values below u) + (count of u + 1) / 2. Also returns, per resample, whether
    it holds at least two distinct values (otherwise the correlation is undefined).
    """
    unique, inverse = np.unique(values, return_inverse=True)
    per_value = counts @ (inverse[:, None] == np.arange(len(unique))[None, :])  # tied points' counts summed
    below = np.cumsum(per_value, axis=1) - per_value
    ranks = (below + (per_value + 1) / 2.0)[:, inverse]
    varied = (per_value > 0).sum(axis=1) >= 2
    return ranks, varied


def _bootstrap(a: np.ndarray, b: np.ndarray, n_boot: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Spearman and Pearson over ``n_boot`` resamples of the points (with replacement)."""
    n = len(a)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    counts = np.bincount((idx + n * np.arange(n_boot)[:, None]).ravel(), minlength=n_boot * n)
    counts = counts.reshape(n_boot, n).astype(float)
    ra, varied_a = _resample_ranks(a, counts)
    rb, varied_b = _resample_ranks(b, counts)
    ok = varied_a & varied_b
    rho = np.where(ok, _weighted_corr(ra, rb, counts), np.nan)
    r = np.where(ok, _weighted_corr(a[None, :], b[None, :], counts), np.nan)
    return rho, r


def _interval(samples: np.ndarray) -> tuple[float, float]:
    finite = samples[np.isfinite(samples)]
    if len(finite) < 2:
        return float("nan"), float("nan")
    lo, hi = np.percentile(finite, [2.5, 97.5])
    return float(lo), float(hi)


def correlations(
    aligned_or_frame: pd.DataFrame,
    loss_metric: str,
    downstream_metrics: str | Sequence[str],
    *,
    window: tuple[float, float] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    x: str = "step",
    n_params: int | float | Mapping[str, float] | None = None,
    log_interp: bool = True,
    min_points: int = 3,
) -> pd.DataFrame:
    """Rank and linear correlation between loss and each downstream score, per run, with bootstrap intervals.

    Takes the long table or the output of ``align`` (several ``align`` outputs concatenated also work).
    ``window=(lo, hi)`` keeps checkpoints with lo <= x <= hi. The 95% intervals are percentile intervals over
    ``n_boot`` resamples of the checkpoints with replacement (resamples whose loss or score is constant are
    skipped); the generator is seeded with ``seed`` for every (run, metric) so results do not depend on which
    other runs are in the frame. Runs with fewer than ``min_points`` checkpoints are left out.

    Columns: run, downstream, n, spearman, spearman_lo, spearman_hi, pearson, pearson_lo, pearson_hi.
    """
    metrics = [downstream_metrics] if isinstance(downstream_metrics, str) else list(downstream_metrics)
    if not metrics:
        raise ValueError("downstream_metrics is empty: name at least one downstream metric")
    if n_boot < 0:
        raise ValueError(f"n_boot={n_boot} must be >= 0")
    if min_points < 3:
        raise ValueError(f"min_points={min_points}: a correlation needs at least 3 points")
    if window is not None:
        lo, hi = window
        if not lo <= hi:
            raise ValueError(f"window {window}: give (lo, hi) with lo <= hi")
    points = _aligned_for(aligned_or_frame, loss_metric, metrics, x=x, n_params=n_params, log_interp=log_interp)
    rows = []
    for (run, metric), group in points.groupby(["run", "right_metric"], sort=True):
        group = _finite_pairs(group)
        if window is not None:
            group = group[(group["x"] >= window[0]) & (group["x"] <= window[1])]
        if len(group) < min_points:
            continue
        a = group["left"].to_numpy(dtype=float)
        b = group["right"].to_numpy(dtype=float)
        row = {"run": run, "downstream": metric, "n": len(a), "spearman": spearman(a, b), "pearson": pearson(a, b)}
        if n_boot > 0:
            rho, r = _bootstrap(a, b, n_boot, seed)
            row["spearman_lo"], row["spearman_hi"] = _interval(rho)
            row["pearson_lo"], row["pearson_hi"] = _interval(r)
        rows.append(row)
    if not rows:
        return _empty(CORRELATION_COLUMNS)
    return pd.DataFrame(rows).reindex(columns=CORRELATION_COLUMNS)


# -- divergence windows -------------------------------------------------------------------------------------


def _merge_spans(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Union of index spans [i, j]; spans that overlap or share an endpoint become one."""
    merged: list[tuple[int, int]] = []
    for i, j in sorted(spans):
        if merged and i <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], j))
        else:
            merged.append((i, j))
    return merged


def _windows_of_run(
    xs: np.ndarray,
    loss: np.ndarray,
    score: np.ndarray,
    se: np.ndarray,
    *,
    loss_tol: float,
    relative: bool,
    z: float,
    min_points: int,
    trim: bool,
) -> list[dict]:
    n = len(xs)
    tol = loss_tol * np.abs(loss) if relative else np.full(n, loss_tol)  # tolerance per window start
    # Loss range over every span [i, j]: running max/min from each start.
    span_range = np.full((n, n), np.inf)
    for i in range(n):
        span_range[i, i:] = np.maximum.accumulate(loss[i:]) - np.minimum.accumulate(loss[i:])
    rise = score[None, :] - score[:, None]  # score[j] - score[i]
    drop_in_loss = loss[:, None] - loss[None, :]  # loss[i] - loss[j], > 0 when loss improved
    pair_se = np.sqrt(se[:, None] ** 2 + se[None, :] ** 2)
    i_idx, j_idx = np.indices((n, n))
    long_enough = (j_idx - i_idx + 1) >= max(2, min_points)
    kinds = {
        "grokking": long_enough & (span_range <= tol[:, None]) & (rise > 0) & (rise > z * pair_se),
        "inverse": long_enough & (drop_in_loss > tol[:, None]) & (rise < 0) & (-rise > z * pair_se),
    }
    out = []
    for kind, ok in kinds.items():
        spans = [(int(i), int(np.flatnonzero(ok[i])[-1])) for i in range(n) if ok[i].any()]
        for a, b in _merge_spans(spans):
            if trim:
                a, b = _trim(kind, a, b, score, se, z=z, min_points=min_points)
            change = score[b] - score[a]
            combined = float(np.sqrt(se[a] ** 2 + se[b] ** 2))
            z_score = change / combined if combined > 0 else float(np.copysign(np.inf, change))
            out.append(
                {
                    "kind": kind,
                    "start": float(xs[a]),
                    "end": float(xs[b]),
                    "n_points": b - a + 1,
                    "loss_change": float(loss[b] - loss[a]),
                    "loss_range": float(np.ptp(loss[a : b + 1])),
                    "downstream_change": float(change),
                    "z_score": float(z_score),
                }
            )
    return out


def _trim(
    kind: str, a: int, b: int, score: np.ndarray, se: np.ndarray, *, z: float, min_points: int
) -> tuple[int, int]:
    """Shrink a merged window to the move itself: from the lowest score to the first highest one after it
    (grokking), or from the highest to the first lowest after it (inverse). Kept only if still significant.

    "Highest" and "lowest" are up to each point's stderr, so noise on a plateau does not drag the end of
    the window to the plateau's luckiest point."""
    s = score[a : b + 1] if kind == "grokking" else -score[a : b + 1]
    band = se[a : b + 1]
    end = int(np.argmax(s >= s.max() - band))  # first point within a stderr of the peak
    head = s[: end + 1]
    start = int(end - np.argmax((head <= head.min() + band[: end + 1])[::-1]))  # last one near the trough
    ta, tb = a + start, a + end
    moved = s[end] - s[start]
    if tb - ta + 1 >= max(2, min_points) and moved > 0 and moved > z * np.sqrt(se[ta] ** 2 + se[tb] ** 2):
        return ta, tb
    return a, b


def divergence_windows(
    frame: pd.DataFrame,
    loss_metric: str,
    downstream_metric: str,
    *,
    loss_tol: float = 0.02,
    relative: bool = True,
    z: float = 2.0,
    min_points: int = 2,
    trim: bool = True,
    x: str = "step",
    n_params: int | float | Mapping[str, float] | None = None,
    log_interp: bool = True,
    missing_stderr: str = "scatter",
) -> pd.DataFrame:
    """Spans of checkpoints where loss and downstream part ways, per run.

    Points are the checkpoints where the downstream score was measured, with the loss interpolated there
    (``align``). For a span of consecutive points i..j:

    - **flat loss**: max(loss) - min(loss) over the span's points <= tol, where tol = ``loss_tol`` * |loss_i|
      when ``relative`` (default: 2% of the loss at the span's start) and ``loss_tol`` itself otherwise;
    - **loss improves**: loss_i - loss_j > tol (it fell by more than what counts as flat);
    - **significant move**: |score_j - score_i| > ``z`` * sqrt(se_i^2 + se_j^2), the stderrs of the two
      endpoint scores combined. A score logged without a stderr (a training log's ``eval/accuracy``) gets
      one from the series itself with ``missing_stderr="scatter"`` (default, see :func:`scatter_stderr`),
      so checkpoint-to-checkpoint jitter is not read as a move; with ``"zero"`` it counts as 0, so any
      move qualifies (z_score inf). Column ``stderr_source`` says which: reported, scatter or none.

    ``grokking`` spans have flat loss and a significant rise; ``inverse`` spans have improving loss and a
    significant fall. Every qualifying span of at least ``min_points`` points is found; spans of one kind
    that overlap or share an endpoint are merged into one maximal window. With ``trim`` (default), a merged
    window is then shrunk to the move itself (grokking: from the last lowest score to the first highest score
    after it; inverse: the mirror), unless the trimmed span would no longer be significant; so a long flat
    stretch with the rise in its middle reports the rise's bounds.

    Columns: run, kind, start, end (x units), n_points, loss_change (loss_end - loss_start), loss_range
    (max - min inside the window), downstream_change (score_end - score_start), z_score (that change over
    the combined endpoint stderr).
    """
    if loss_tol < 0:
        raise ValueError(f"loss_tol={loss_tol} must be >= 0")
    if z < 0:
        raise ValueError(f"z={z} must be >= 0")
    if min_points < 2:
        raise ValueError(f"min_points={min_points}: a window needs at least 2 points")
    if missing_stderr not in ("scatter", "zero"):
        raise ValueError(f"missing_stderr={missing_stderr!r}: use 'scatter' or 'zero'")
    points = align(frame, loss_metric, downstream_metric, x=x, n_params=n_params, log_interp=log_interp)
    rows = []
    for run, group in points.groupby("run", sort=True):
        group = _finite_pairs(group).sort_values("x")
        if len(group) < min_points:
            continue
        score = group["right"].to_numpy(dtype=float)
        se = np.abs(group["right_stderr"].to_numpy(dtype=float))
        source = "reported"
        if np.isnan(se).any():
            fill = scatter_stderr(score) if missing_stderr == "scatter" else 0.0
            source = "scatter" if fill > 0 else "none"
            if not np.isnan(se).all():
                source = f"reported+{source}"
            se = np.where(np.isnan(se), fill, se)
        found = _windows_of_run(
            group["x"].to_numpy(dtype=float),
            group["left"].to_numpy(dtype=float),
            score,
            se,
            loss_tol=loss_tol,
            relative=relative,
            z=z,
            min_points=min_points,
            trim=trim,
        )
        rows.extend({"run": run, **w, "stderr_source": source} for w in found)
    if not rows:
        return _empty(WINDOW_COLUMNS)
    return pd.DataFrame(rows).sort_values(["run", "start", "kind"], ignore_index=True)[WINDOW_COLUMNS]


def scatter_stderr(values: np.ndarray) -> float:
    """Per-point noise of a series from its own checkpoint-to-checkpoint jitter.

    sigma = 1.4826 * MAD(first differences) / sqrt(2): a difference of two independent points has
    twice a point's variance, and the median absolute deviation ignores the few large differences
    of a real move, so a sharp rise does not inflate its own noise estimate. 0 for fewer than
    three points or a series without jitter.
    """
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if len(values) < 3:
        return 0.0
    diffs = np.diff(values)
    mad = float(np.median(np.abs(diffs - np.median(diffs))))
    return 1.4826 * mad / math.sqrt(2)


# -- matched loss -------------------------------------------------------------------------------------------


def _monotone_curve(group: pd.DataFrame) -> pd.DataFrame:
    """The checkpoints that set a new lowest loss, in training order: loss strictly falls along them."""
    group = _finite_pairs(group).sort_values("x")
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
                raise ValueError(f"run {run!r} not in the data; available: {_available(known)}")
    if isinstance(levels, Integral) and levels < 1:
        raise ValueError(f"levels={levels}: ask for at least one loss level")
    curves = {run: _monotone_curve(points[points["run"] == run]) for run in runs}
    if not runs or any(c.empty for c in curves.values()):
        return _empty(MATCHED_COLUMNS)
    lo = max(float(c["left"].min()) for c in curves.values())
    hi = min(float(c["left"].max()) for c in curves.values())
    if lo > hi:
        return _empty(MATCHED_COLUMNS)
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
    out = pd.concat(pieces, ignore_index=True).sort_values("_order", ignore_index=True)
    return out[MATCHED_COLUMNS]


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
    points = _finite_pairs(align(frame, loss_metric, downstream_metric, x=x, n_params=n_params, log_interp=log_interp))
    loss = points["left"].to_numpy(dtype=float)
    score = points["right"].to_numpy(dtype=float)
    intercept, slope = _linear_fit(loss, score)
    if not np.isfinite(slope):
        return _empty(RESIDUAL_COLUMNS)
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
    return out[RESIDUAL_COLUMNS]


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

    Points with equal x are first averaged (weighted by their count), then ``pava`` runs on the sorted
    means; ``increasing=False`` fits a non-increasing function. Predict elsewhere with ``np.interp``.
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"isotonic_fit needs two equal, non-empty series (got {len(x)} and {len(y)})")
    ux, inverse = np.unique(x, return_inverse=True)
    counts = np.bincount(inverse).astype(float)
    means = np.bincount(inverse, weights=y) / counts
    sign = 1.0 if increasing else -1.0
    return ux, sign * pava(sign * means, counts)


def _loo_errors(x: np.ndarray, y: np.ndarray, increasing: bool, max_held_out: int = 200) -> tuple[float, float]:
    """Leave-one-out RMSE of the isotonic fit, and 1 - SSE / SSE of the leave-one-out mean (an R^2).

    Every point is held out in turn and predicted by the fit on all the others. Above ``max_held_out``
    points, only that many evenly spaced points are held out (each still against all the others), which
    bounds the cost at ``max_held_out`` fits.
    """
    n = len(x)
    held_out = np.arange(n) if n <= max_held_out else np.unique(np.linspace(0, n - 1, max_held_out).round()).astype(int)
    # Group equal x once; holding a point out then only changes its group's count and sum.
    ux, inverse = np.unique(x, return_inverse=True)
    counts = np.bincount(inverse).astype(float)
    sums = np.bincount(inverse, weights=y)
    sign = 1.0 if increasing else -1.0
    errors = np.empty(len(held_out))
    for k, i in enumerate(held_out):
        g = inverse[i]
        c, t = counts.copy(), sums.copy()
        c[g] -= 1
        t[g] -= y[i]
        keep = c > 0
        fit = sign * pava(sign * t[keep] / c[keep], c[keep])
        errors[k] = y[i] - np.interp(x[i], ux[keep], fit)
    loo_mean = (y.sum() - y[held_out]) / (n - 1)
    baseline = float(((y[held_out] - loo_mean) ** 2).sum())
    sse = float((errors**2).sum())
    r2 = 1.0 - sse / baseline if baseline > 0 else float("nan")
    return float(np.sqrt(sse / len(held_out))), r2


def _default_candidates(metrics: Sequence[str], downstream_metric: str) -> list[str]:
    """Every metric but the target, lm-eval scores (``task/metric,filter``) and schedule bookkeeping."""
    out = []
    for metric in sorted(set(metrics)):
        if metric == downstream_metric or "," in metric or metric.rsplit("/", 1)[-1].lower() in _NOT_SIGNALS:
            continue
        out.append(metric)
    return out


def _rank_one(run: str, predictor: str, downstream: str, a: np.ndarray, b: np.ndarray, is_loss: bool) -> dict:
    rho = spearman(a, b)
    sign = 0 if not np.isfinite(rho) or rho == 0 else int(np.sign(rho))
    rmse, r2 = _loo_errors(a, b, increasing=sign >= 0)
    return {
        "run": run,
        "predictor": predictor,
        "downstream": downstream,
        "n": len(a),
        "spearman": rho,
        "abs_spearman": abs(rho),
        "sign": sign,
        "loo_rmse": rmse,
        "loo_r2": r2,
        "is_loss": is_loss,
    }


def predictor_ranking(
    frame: pd.DataFrame,
    downstream_metric: str,
    *,
    candidates: Sequence[str] | None = None,
    loss_metric: str | None = None,
    per_run: bool = False,
    min_points: int = 4,
    x: str = "step",
    n_params: int | float | Mapping[str, float] | None = None,
    log_interp: bool = True,
) -> pd.DataFrame:
    """How well each signal predicts the downstream score across checkpoints, strongest first.

    Each candidate is aligned to the downstream checkpoints (``align``: interpolated at the checkpoints'
    x, never extrapolated) and checkpoints of all runs are pooled (``run`` = ``"(pooled)"``); with
    ``per_run`` each run is also scored alone, in rows after the pooled ones. Per candidate:
    ``spearman`` (signed) and ``abs_spearman``, ``sign`` (+1: higher signal, higher score), and the
    leave-one-out error of an isotonic fit whose direction is the sign of the Spearman on all points:
    ``loo_rmse``, and ``loo_r2`` = 1 - SSE / SSE of predicting each point by the mean of the others
    (above 200 points, 200 evenly spaced points are held out, each against all the others).
    ``candidates=None`` takes every other metric except lm-eval scores (names with a comma, e.g.
    ``arc_easy/acc,none``) and schedule bookkeeping (``lr``, ``epoch``, ...). ``loss_metric`` is always
    scored and flagged ``is_loss``: the baseline a signal has to beat. Candidates with fewer than
    ``min_points`` checkpoints are left out. Sorted by abs_spearman (descending), then loo_rmse.

    Columns: run, predictor, downstream, n, spearman, abs_spearman, sign, loo_rmse, loo_r2, is_loss.
    """
    _check_frame(frame)
    _check_metric(frame, downstream_metric)
    if min_points < 3:
        raise ValueError(f"min_points={min_points}: leave-one-out needs at least 3 points")
    if candidates is None:
        names = _default_candidates(frame["metric"].astype(str).unique(), downstream_metric)
    else:
        names = [candidates] if isinstance(candidates, str) else list(candidates)
        for name in names:
            _check_metric(frame, name)
    if loss_metric is not None:
        _check_metric(frame, loss_metric)
        if loss_metric not in names:
            names.append(loss_metric)
    rows, run_rows = [], []
    for name in names:
        if name == downstream_metric:
            continue
        points = _finite_pairs(align(frame, name, downstream_metric, x=x, n_params=n_params, log_interp=log_interp))
        a = points["left"].to_numpy(dtype=float)
        b = points["right"].to_numpy(dtype=float)
        if len(a) >= min_points:
            rows.append(_rank_one(POOLED, name, downstream_metric, a, b, name == loss_metric))
        if per_run:
            for run, group in points.groupby("run", sort=True):
                if len(group) >= min_points:
                    ga = group["left"].to_numpy(dtype=float)
                    gb = group["right"].to_numpy(dtype=float)
                    run_rows.append(_rank_one(run, name, downstream_metric, ga, gb, name == loss_metric))
    if not rows and not run_rows:
        return _empty(RANKING_COLUMNS)
    parts = []
    for chunk, keys in ((rows, ["abs_spearman", "loo_rmse"]), (run_rows, ["run", "abs_spearman", "loo_rmse"])):
        if chunk:
            ascending = [True, False, True] if len(keys) == 3 else [False, True]
            parts.append(pd.DataFrame(chunk).sort_values(keys, ascending=ascending, na_position="last"))
    return pd.concat(parts, ignore_index=True)[RANKING_COLUMNS]


# --- choosing sensible defaults for the views -------------------------------------------------------

_LOSS_PREFERENCE = ("eval/loss", "train/loss")


def loss_metrics(names: Sequence[str]) -> list[str]:
    """Metrics that are a loss (logged losses and held-out losses), the preferred first."""
    names = list(dict.fromkeys(names))
    losses = [n for n in names if n in _LOSS_PREFERENCE or n.endswith(("/heldout_loss", "/loss"))]
    return sorted(
        losses, key=lambda n: (n not in _LOSS_PREFERENCE, _LOSS_PREFERENCE.index(n) if n in _LOSS_PREFERENCE else 0, n)
    )


def downstream_metrics(names: Sequence[str]) -> list[str]:
    """Metrics that are a downstream score: lm-eval results (``task/metric,filter``) and logged accuracies."""
    names = list(dict.fromkeys(names))
    scores = [n for n in names if ("," in n and "/" in n and "stderr" not in n) or n.endswith("/accuracy")]
    return sorted(scores, key=lambda n: ("," not in n, n))
