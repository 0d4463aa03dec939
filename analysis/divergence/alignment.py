"""Two series side by side: alignment on step, tokens or FLOPs, and interpolation at checkpoints.

The second ("right") series is the sparse one, a downstream score at checkpoints; the first ("left"), often
logged every step, is interpolated at the right series' x positions, on log-x by default because
checkpoints are usually log-spaced. Nothing is extrapolated. A metric under two settings is refused, and
unconverged estimates are left out unless asked for.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from analysis.divergence.frames import ALIGNED_COLUMNS, available, check_frame, check_metric, check_x, empty_frame
from analysis.settings import unconverged


def add_flops(frame: pd.DataFrame, n_params: int | float | Mapping[str, float]) -> pd.DataFrame:
    """A copy of ``frame`` with a ``flops`` column: 6 * n_params * tokens (the dense-transformer estimate).

    ``n_params`` is one count for every run or a run -> count mapping that must name every run in the frame.
    Rows with unknown tokens get no FLOPs (NaN).
    """
    check_frame(frame)
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


def _one_setting(data: pd.DataFrame) -> None:
    """Refuse a frame holding one (run, metric) under two settings: averaging them would mix experiments."""
    if "params_hash" not in data or data.empty:
        return
    counts = data.groupby(["run", "metric"])["params_hash"].nunique()
    mixed = counts[counts > 1]
    if len(mixed):
        (run, metric), k = mixed.index[0], int(mixed.iloc[0])
        raise ValueError(
            f"metric {metric!r} of run {run!r} has {k} settings in the data; pick one per metric first "
            "(analysis.settings.select_settings, or the variant picker on the page)"
        )


def _prepare(
    frame: pd.DataFrame,
    metrics: Sequence[str],
    *,
    x: str,
    n_params: int | float | Mapping[str, float] | None,
    include_unconverged: bool = False,
) -> pd.DataFrame:
    """Rows of ``metrics`` with numeric run/x/step/tokens/value/stderr, NaNs and unconverged rows dropped."""
    check_frame(frame)
    check_x(x)
    for metric in metrics:
        check_metric(frame, metric)
    data = frame[frame["metric"].astype(str).isin(list(metrics))].copy()
    if not include_unconverged:
        data = data[~unconverged(data)]
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
    _one_setting(data)
    for column in ("step", "tokens", "value", "stderr", *(("flops",) if x == "flops" else ())):
        data[column] = pd.to_numeric(data[column], errors="coerce").astype(float)
    data["x"] = data[x]
    data = data[np.isfinite(data["x"]) & np.isfinite(data["value"])]
    if data.empty:
        return pd.DataFrame(columns=["run", "metric", "x", "step", "tokens", "value", "stderr"])
    # One value per (run, metric, x) remains; a log that repeats a step keeps their mean.
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
    include_unconverged: bool = False,
    measured_only: bool = False,
) -> pd.DataFrame:
    """Two series of each run side by side at the right series' x positions.

    The left series (e.g. ``train/loss``, logged every step) is linearly interpolated at the x of every
    right-series point (e.g. a downstream score at a checkpoint), on log-x when ``log_interp`` and every x
    of the run is positive (checkpoints are usually log-spaced), on linear x otherwise. Right points outside
    the left series' x range are left out (no extrapolation). The left stderr is interpolated the same way.
    ``x`` is ``step``, ``tokens`` or ``flops`` (6 * n_params * tokens; ``n_params`` one count or per run).
    ``measured_only``: in a run where the left series is sparser than the right one over their common range (a
    metric computed at a few checkpoints, not a log), only the right points where the left one was measured
    at the same x are kept: interpolating it would invent points, and a test counting them would claim more
    evidence than there is.

    Columns: run, x, step, tokens, left_metric, right_metric, left, left_stderr, right, right_stderr.
    """
    data = _prepare(frame, [left_metric, right_metric], x=x, n_params=n_params, include_unconverged=include_unconverged)
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
        if measured_only and np.count_nonzero((lx >= rx[0]) & (lx <= rx[-1])) < len(rx):
            exact = np.isin(rx, lx)
            right, rx = right[exact], rx[exact]
            if not len(rx):
                continue
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
    out = pd.concat(pieces, ignore_index=True)[ALIGNED_COLUMNS] if pieces else empty_frame(ALIGNED_COLUMNS)
    out.attrs["x"] = x
    return out


def aligned_for(
    data: pd.DataFrame,
    loss_metric: str,
    downstream_metrics: Sequence[str],
    *,
    x: str,
    n_params: int | float | Mapping[str, float] | None,
    log_interp: bool,
) -> pd.DataFrame:
    """Aligned (loss, downstream) points from either a long table or an ``align`` result."""
    if isinstance(data, pd.DataFrame) and {"left_metric", "right_metric", "left", "right"} <= set(data.columns):
        lefts = set(data["left_metric"].astype(str).unique())
        if loss_metric not in lefts:
            raise ValueError(f"metric {loss_metric!r} not in the data; available: {available(lefts)}")
        rights = set(data["right_metric"].astype(str).unique())
        for metric in downstream_metrics:
            if metric not in rights:
                raise ValueError(f"metric {metric!r} not in the data; available: {available(rights)}")
        keep = (data["left_metric"] == loss_metric) & data["right_metric"].isin(list(downstream_metrics))
        return data[keep]
    check_frame(data)
    for metric in [loss_metric, *downstream_metrics]:
        check_metric(data, metric)
    pieces = [align(data, loss_metric, m, x=x, n_params=n_params, log_interp=log_interp) for m in downstream_metrics]
    return pd.concat(pieces, ignore_index=True) if pieces else empty_frame(ALIGNED_COLUMNS)


def finite_pairs(group: pd.DataFrame) -> pd.DataFrame:
    """The aligned points where both series have a finite value."""
    return group[np.isfinite(group["left"].astype(float)) & np.isfinite(group["right"].astype(float))]
