"""The Forecast page's figure: a run's measured score, the curve fitted to its early checkpoints with its
prediction band, and each forecast with its interval."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from analysis.charts.style import PALETTE, X_LABELS, ChartStyle, _layout, _rgba

if TYPE_CHECKING:
    from analysis.forecast import Forecast


def forecast_figure(
    measured: pd.DataFrame,
    rows: pd.DataFrame,
    result: Forecast,
    *,
    x: str = "step",
    log_x: bool = True,
    color: str = PALETTE[0],
    style: ChartStyle | None = None,
    title: str | None = None,
) -> go.Figure:
    """A run's measured score (filled: fitted; hollow: hidden), the fitted curve with its prediction band out to
    the horizon, and each prediction with its interval.

    ``measured`` has x and value (every checkpoint); ``rows`` and ``result`` are ``analysis.forecast.forecast``'s
    two outputs (``result.curve_x``/``curve``/``curve_lo``/``curve_hi`` draw the band).
    """
    style = style or ChartStyle()
    fit_until = float(rows["fit_until"].iloc[0]) if len(rows) else float("inf")
    level = float(rows["level"].iloc[0]) if len(rows) else 0.9
    fig = go.Figure()
    if np.isfinite(result.curve_lo).any():
        _fitted_curve_traces(fig, result, color, level)
    _measured_traces(fig, measured[measured["x"] > 0] if log_x else measured, fit_until, color)
    if len(rows):
        fig.add_trace(_forecast_trace(rows))
    if np.isfinite(fit_until):
        fig.add_vline(x=fit_until, line={"color": "#59636e", "width": 1, "dash": "dot"})
    score = str(rows["score"].iloc[0]) if len(rows) else ""
    return _layout(
        fig,
        style,
        title=title or f"{score}: fitted up to {X_LABELS.get(x, x)} {fit_until:g}, forecast with {level:.0%} intervals",
        x_title=X_LABELS.get(x, x) + (" (log)" if log_x else ""),
        y_title=score,
        log_x=log_x,
        log_y=False,
    )


def _fitted_curve_traces(fig: go.Figure, result: Forecast, color: str, level: float) -> None:
    """The fitted curve, dashed, over its prediction band out to the horizon."""
    fig.add_trace(
        go.Scatter(
            x=np.concatenate([result.curve_x, result.curve_x[::-1]]),
            y=np.concatenate([result.curve_hi, result.curve_lo[::-1]]),
            fill="toself", fillcolor=_rgba(color, 0.15), line={"width": 0}, hoverinfo="skip",
            name=f"{level:.0%} prediction band",
        )
    )  # fmt: skip
    fig.add_trace(
        go.Scatter(
            x=result.curve_x, y=result.curve, mode="lines", line={"color": color, "dash": "dash", "width": 2},
            name=f"{result.method} fit", hovertemplate="fit %{y:.4g}<extra></extra>",
        )
    )  # fmt: skip


def _measured_traces(fig: go.Figure, data: pd.DataFrame, fit_until: float, color: str) -> None:
    """The measured checkpoints: filled where the fit saw them, hollow where they were hidden from it."""
    for hidden, name, symbol in ((False, "fitted checkpoints", "circle"), (True, "hidden checkpoints", "circle-open")):
        part = data[(data["x"] > fit_until) == hidden]
        if len(part):
            fig.add_trace(
                go.Scatter(
                    x=part["x"], y=part["value"], mode="markers", name=name,
                    marker={"color": color, "size": 9, "symbol": symbol, "line": {"width": 2, "color": color}},
                    hovertemplate="measured %{y:.4g}<extra></extra>",
                )
            )  # fmt: skip


def _forecast_trace(rows: pd.DataFrame) -> go.Scatter:
    """Each prediction as a diamond with its (asymmetric) interval as error bars."""
    return go.Scatter(
        x=rows["x"], y=rows["predicted"], mode="markers", name="forecast",
        marker={"color": "#D55E00", "size": 9, "symbol": "diamond"},
        error_y={"type": "data", "symmetric": False, "array": rows["hi"] - rows["predicted"],
                 "arrayminus": rows["predicted"] - rows["lo"], "color": "#D55E00"},
        hovertemplate="forecast %{y:.4g}<extra></extra>",
    )  # fmt: skip
