"""The Runs page's figure: one metric against step, tokens or FLOPs, one line per run, with optional EMA
smoothing, ±1 stderr bands and unconverged estimates marked off the line."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from analysis.charts.series import _raw, ema
from analysis.charts.style import PALETTE, X_LABELS, ChartStyle, _layout, empty_figure, run_colors
from analysis.settings import unconverged


def curves_figure(
    frame: pd.DataFrame,
    metric: str,
    *,
    x: str = "step",
    smoothing: float = 0.0,
    log_x: bool = False,
    log_y: bool = False,
    colors: dict[str, str] | None = None,
    style: ChartStyle | None = None,
    title: str | None = None,
) -> go.Figure:
    """One metric against step or tokens, one line per run.

    With smoothing, the raw curve is drawn faint behind the smoothed one. With a
    ``stderr`` column, a band of +-1 stderr is drawn. Rows whose x is missing (e.g.
    tokens unknown) or non-positive on a log axis are left out, and the title says so.
    """
    style = style or ChartStyle()
    if x not in X_LABELS:
        raise ValueError(f"x-axis {x!r}: choose one of {', '.join(X_LABELS)}")
    data = frame[frame["metric"] == metric].copy()
    if x not in data:
        data[x] = np.nan
    data = data.dropna(subset=[x, "value"])
    if log_x:
        data = data[data[x] > 0]
    if data.empty:
        why = f"no {X_LABELS[x]} values for {metric}" if len(frame) else f"no data for {metric}"
        return empty_figure(why, style)
    colors = colors or run_colors(data["run"])
    fig = go.Figure()
    # An iterative estimate that did not converge is no value: a hollow cross off the line, never joined to it.
    bad = unconverged(data)
    if bad.any():
        _unconverged_markers(fig, data[bad], x, colors)
        data = data[~bad]
    for run, group in data.groupby("run", sort=True):
        _run_traces(fig, run, group.sort_values(x), x, colors.get(str(run), PALETTE[0]), smoothing, style)
    n_bad = int(bad.sum())
    note = f" ({n_bad} estimate{'s' if n_bad > 1 else ''} did not converge: ×)" if n_bad else ""
    return _layout(
        fig,
        style,
        title=(title or metric) + note,
        x_title=X_LABELS[x] + (" (log)" if log_x else ""),
        y_title=metric,
        log_x=log_x,
        log_y=log_y,
    )


def _run_traces(
    fig: go.Figure, run: object, group: pd.DataFrame, x: str, color: str, smoothing: float, style: ChartStyle
) -> None:
    """``run``'s line (``group`` sorted by ``x``), over its stderr band and, when smoothed, its faint raw curve."""
    xs, ys = group[x].to_numpy(dtype=float), group["value"].to_numpy(dtype=float)
    mode = "lines" if len(group) > 1 else "markers"  # a one-point line would be invisible
    if "stderr" in group and group["stderr"].notna().any():
        err = group["stderr"].fillna(0.0).to_numpy(dtype=float)
        fig.add_trace(
            go.Scatter(
                x=np.concatenate([xs, xs[::-1]]),
                y=np.concatenate([ys + err, (ys - err)[::-1]]),
                fill="toself",
                fillcolor=color,
                opacity=0.18,
                line={"width": 0},
                hoverinfo="skip",
                showlegend=False,
                legendgroup=str(run),
                name=f"{run} ±1 stderr",
            )
        )
    if smoothing > 0:
        fig.add_trace(_raw(xs, ys, mode, color, str(run), hover=True))
        ys = ema(ys, smoothing)
    fig.add_trace(
        go.Scatter(
            x=xs,
            y=ys,
            mode=mode,
            line={"color": color, "width": style.line_width},
            marker={"color": color, "size": 8},
            name=str(run),
            legendgroup=str(run),
            hovertemplate="%{y:.4g}<extra>" + str(run) + "</extra>",
        )
    )


def _unconverged_markers(fig: go.Figure, rows: pd.DataFrame, x: str, colors: dict[str, str]) -> None:
    """Each run's unconverged estimates as hollow crosses in its colour, not joined to its line."""
    for run, group in rows.groupby("run", sort=True):
        fig.add_trace(
            go.Scatter(
                x=group[x].to_numpy(dtype=float),
                y=group["value"].to_numpy(dtype=float),
                mode="markers",
                marker={
                    "color": colors.get(str(run), PALETTE[0]),
                    "size": 10,
                    "symbol": "x-thin-open",
                    "line": {"width": 2},
                },
                name=f"{run} (not converged)",
                legendgroup=str(run),
                hovertemplate="%{y:.4g} — did not converge<extra>" + str(run) + "</extra>",
            )
        )
