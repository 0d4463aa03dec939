"""Pieces shared by the line figures of long-form series: EMA smoothing, one metric's rows with numeric x,
value and stderr, the ±1 stderr band drawn behind a run's line, and the faint raw curve behind a smoothed one."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from analysis.charts.style import _rgba


def ema(values: np.ndarray | pd.Series, weight: float) -> np.ndarray:
    """Debiased exponential moving average, as experiment trackers draw it.

    ``weight`` in [0, 1): 0 returns the values unchanged. The debiasing divides by
    1 - weight^t so the first points are not pulled towards zero.
    """
    if not 0.0 <= weight < 1.0:
        raise ValueError(f"smoothing weight {weight} must be in [0, 1)")
    x = np.asarray(values, dtype=float)
    out = np.empty_like(x)
    acc, norm = 0.0, 0.0
    for i, v in enumerate(x):
        if not np.isfinite(v):  # carry the average over gaps instead of poisoning it
            out[i] = acc / norm if norm else np.nan
            continue
        acc = weight * acc + (1 - weight) * v
        norm = weight * norm + (1 - weight)
        out[i] = acc / norm
    return out


def _metric_rows(frame: pd.DataFrame, metric: str, x: str, log_x: bool) -> pd.DataFrame:
    """One metric's rows with numeric x/value/stderr, rows without x or value (or x <= 0 on log-x) dropped."""
    data = frame[frame["metric"] == metric].copy()
    for column in (x, "stderr"):
        if column not in data:
            data[column] = np.nan
    for column in (x, "value", "stderr"):
        data[column] = pd.to_numeric(data[column], errors="coerce")
    data = data.dropna(subset=[x, "value"])
    return data[data[x] > 0] if log_x else data


def _band(xs: np.ndarray, ys: np.ndarray, err: np.ndarray, color: str, run: str) -> go.Scatter:
    """The filled band ``ys`` ± ``err`` behind ``run``'s line, in its colour, kept out of the legend."""
    return go.Scatter(
        x=np.concatenate([xs, xs[::-1]]),
        y=np.concatenate([ys + err, (ys - err)[::-1]]),
        fill="toself",
        fillcolor=_rgba(color, 0.18),
        mode="lines",  # Plotly adds markers to short traces by default: none on a band's outline
        line={"width": 0},
        hoverinfo="skip",
        showlegend=False,
        legendgroup=run,
        name=f"{run} ±1 stderr",
    )


def _raw(xs: np.ndarray, ys: np.ndarray, mode: str, color: str, run: str, *, hover: bool) -> go.Scatter:
    """``run``'s unsmoothed curve, faint, behind its smoothed line; out of the legend. ``hover``: show its values."""
    return go.Scatter(
        x=xs,
        y=ys,
        mode=mode,
        line={"color": color, "width": 1},
        opacity=0.3,
        showlegend=False,
        legendgroup=run,
        name=f"{run} (raw)",
        **({"hovertemplate": "%{y:.4g}<extra>" + f"{run} raw</extra>"} if hover else {"hoverinfo": "skip"}),
    )
