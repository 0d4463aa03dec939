"""Plotly figures from data frames. No Streamlit here: the same figures go into reports.

Every figure takes long-form frames (run, step, tokens, metric, value[, stderr]) and a
``ChartStyle``; run colours come from one colour-blind-safe palette, assigned by the sorted
run names, so a run has the same colour on every page and in every report.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from analysis.charts.compare import matched_loss_figure, residual_figure
from analysis.charts.curves import curves_figure
from analysis.charts.divergence import (
    DIVERGING_SCALE,
    KIND_COLORS,
    PHASE_FILLS,
    PHASE_SWATCHES,
    loss_downstream_figure,
    ranking_heatmap,
    trajectory_figure,
)
from analysis.charts.pairs import STEP_SCALE
from analysis.charts.series import _band, _metric_rows, ema
from analysis.charts.signals import metric_vs_figure
from analysis.charts.style import (
    PALETTE,
    X_LABELS,
    ChartStyle,
    _layout,
    _rgba,
    axis_label,
    empty_figure,
    run_colors,
    wrap_text,
    wrap_title,
)

# --- per-sample views ------------------------------------------------------------------------------------

SAMPLE_COLORS = {0.0: "#D55E00", 1.0: "#0072B2"}  # wrong / right, colour-blind safe


def sample_heatmap(
    right: pd.DataFrame, order: list[str] | None = None, *, style: ChartStyle | None = None, title: str = ""
) -> go.Figure:
    """Samples (rows) x checkpoints (columns), right in blue and wrong in vermillion, gaps blank.

    ``right`` is :func:`analysis.samples.correctness`'s table; ``order`` the sample ids top to
    bottom (e.g. by the step they were learnt). Columns are evenly spaced and labelled by step,
    so log-spaced checkpoints stay readable.
    """
    style = style or ChartStyle()
    if right.empty:
        return empty_figure("no per-sample results", style)
    table = right.loc[order] if order is not None else right
    steps = [str(s) for s in table.columns]
    fig = go.Figure(
        go.Heatmap(
            z=table.to_numpy(dtype=float),
            x=steps,
            y=[str(s) for s in table.index],
            zmin=0,
            zmax=1,
            colorscale=[
                [0, SAMPLE_COLORS[0.0]],
                [0.5, SAMPLE_COLORS[0.0]],
                [0.5, SAMPLE_COLORS[1.0]],
                [1, SAMPLE_COLORS[1.0]],
            ],
            showscale=False,
            hovertemplate="sample %{y}<br>step %{x}<br>%{customdata}<extra></extra>",
            customdata=np.where(table.to_numpy(dtype=float) >= 0.5, "right", "wrong"),
        )
    )
    height = max(style.height, min(1200, 60 + 4 * len(table)))
    _layout(
        fig, replace(style, height=height), title=title, x_title="checkpoint step", y_title="sample",
        log_x=False, log_y=False,
    )  # fmt: skip
    fig.update_xaxes(type="category", showgrid=False)
    fig.update_yaxes(type="category", showticklabels=len(table) <= 60, autorange="reversed", showgrid=False)
    fig.update_layout(hovermode="closest", showlegend=False)
    return fig


def learnt_figure(
    per_step: pd.DataFrame, n_samples: int, *, style: ChartStyle | None = None, title: str = ""
) -> go.Figure:
    """Bars: samples learnt for good at each checkpoint; line: the share learnt so far."""
    style = style or ChartStyle()
    if per_step.empty:
        return empty_figure("no checkpoints", style)
    steps = [str(s) for s in per_step["step"]]
    fig = go.Figure()
    fig.add_trace(go.Bar(x=steps, y=per_step["learnt"], name="learnt at this checkpoint", marker_color=PALETTE[0]))
    share = per_step["cumulative"] / max(n_samples, 1)
    fig.add_trace(
        go.Scatter(
            x=steps, y=share, name="share learnt so far", yaxis="y2", mode="lines+markers",
            line={"color": PALETTE[1], "width": style.line_width},
        )
    )  # fmt: skip
    _layout(fig, style, title=title, x_title="checkpoint step", y_title="samples", log_x=False, log_y=False)
    fig.update_xaxes(type="category")
    # The share axis keeps its own ticks (0%..100%), not ones lined up with the count axis (0.135, 0.27, ...).
    fig.update_layout(
        yaxis2={"title": {"text": "share", "font": {"size": style.font_size}}, "overlaying": "y", "side": "right",
                "range": [0, 1.05], "tickformat": ".0%", "tickmode": "linear", "tick0": 0, "dtick": 0.25,
                "showgrid": False, "tickfont": {"size": style.tick_size}}
    )  # fmt: skip
    return fig


def group_trends_figure(
    trends: pd.DataFrame,
    metric: str,
    *,
    log_x: bool = False,
    style: ChartStyle | None = None,
    title: str = "",
    marks: dict[str, float] | None = None,
) -> go.Figure:
    """One line per memorisation group (columns step, group, metric, value, stderr), with +-1 stderr bands.

    ``marks`` puts a dotted vertical line at each group's memorisation step, in the group's colour.
    """
    style = style or ChartStyle()
    data = trends[trends["metric"] == metric].sort_values("step")
    if data.empty:
        return empty_figure(f"no {metric} values for the groups", style)
    fig = go.Figure()
    groups = list(dict.fromkeys(data["group"]))
    for i, group in enumerate(groups):
        color = PALETTE[i % len(PALETTE)] if group != "never memorised" else "#7f7f7f"
        rows = data[data["group"] == group]
        xs, ys = rows["step"].to_numpy(dtype=float), rows["value"].to_numpy(dtype=float)
        err = rows["stderr"].to_numpy(dtype=float)
        if np.isfinite(err).any():
            fig.add_trace(_band(xs, ys, np.nan_to_num(err), color, group))
        hover = f"{group}<br>step %{{x}}<br>%{{y:.4g}} (n=%{{customdata}})<extra></extra>"
        fig.add_trace(
            go.Scatter(
                x=xs, y=ys, name=group, mode="lines+markers", line={"color": color, "width": style.line_width},
                customdata=rows["n"], hovertemplate=hover,
            )
        )  # fmt: skip
        if marks and group in marks:
            fig.add_vline(x=marks[group], line={"color": color, "dash": "dot", "width": 1})
    _layout(fig, style, title=title, x_title="step", y_title=metric, log_x=log_x, log_y=False)
    return fig


# -- forecasts ------------------------------------------------------------------------------------------------


def forecast_figure(
    measured: pd.DataFrame,
    rows: pd.DataFrame,
    result,
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
    data = measured[measured["x"] > 0] if log_x else measured
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
    if len(rows):
        fig.add_trace(
            go.Scatter(
                x=rows["x"], y=rows["predicted"], mode="markers", name="forecast",
                marker={"color": "#D55E00", "size": 9, "symbol": "diamond"},
                error_y={"type": "data", "symmetric": False, "array": rows["hi"] - rows["predicted"],
                         "arrayminus": rows["predicted"] - rows["lo"], "color": "#D55E00"},
                hovertemplate="forecast %{y:.4g}<extra></extra>",
            )
        )  # fmt: skip
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


def small_multiples_figure(
    series: pd.DataFrame,
    panels: list[tuple[str, str, bool]],
    *,
    x: str = "step",
    log_x: bool = True,
    colors: dict[str, str] | None = None,
    style: ChartStyle | None = None,
    cols: int = 3,
    panel_height: int = 150,
    title: str | None = None,
) -> go.Figure:
    """One small panel per series, in the order given: shared x, free y, stderr bands, one colour per run.

    ``series`` has panel, run, the ``x`` column, value and stderr (``analysis.overview.Overview.series``);
    ``panels`` is (panel, title, derived) in drawing order. A derived panel (a group mean computed from its
    subtasks) is drawn dashed and its title says so. Each run appears once in the legend.
    """
    from plotly.subplots import make_subplots

    style = style or ChartStyle()
    if not panels:
        return empty_figure("no downstream score to draw", style)
    runs = sorted(series["run"].astype(str).unique()) if len(series) else []
    colors = colors or run_colors(runs)
    cols = max(1, min(cols, len(panels)))
    rows = -(-len(panels) // cols)
    # A subplot title wider than its panel runs into the next one's: wrap it to about the panel's width.
    per_line = (100 if style.large else 170) // cols
    titles = [wrap_text(t + (" · derived" if derived else ""), per_line) for _, t, derived in panels]
    fig = make_subplots(
        rows=rows, cols=cols, shared_xaxes="all", subplot_titles=titles, vertical_spacing=min(0.35 / rows, 0.12),
        horizontal_spacing=0.07,
    )  # fmt: skip
    legend_done: set[str] = set()
    for i, (panel, _, derived) in enumerate(panels):
        row, col = i // cols + 1, i % cols + 1
        mine = _metric_rows(series.assign(metric=series["panel"]), panel, x, log_x)
        for run, rows_ in mine.groupby("run", sort=True):
            rows_ = rows_.sort_values(x)
            color = colors.get(str(run), PALETTE[0])
            xs, ys = rows_[x].to_numpy(float), rows_["value"].to_numpy(float)
            err = rows_["stderr"].to_numpy(float)
            if np.isfinite(err).any():
                fig.add_trace(_band(xs, ys, np.nan_to_num(err), color, str(run)), row=row, col=col)
            fig.add_trace(
                go.Scatter(
                    x=xs, y=ys, mode="lines", name=str(run), legendgroup=str(run),
                    showlegend=str(run) not in legend_done,
                    line={"color": color, "width": style.line_width * 0.75, "dash": "dash" if derived else "solid"},
                    hovertemplate=f"{run}<br>{x} %{{x}}<br>value %{{y:.4g}}<extra>{panel}</extra>",
                ),
                row=row, col=col,
            )  # fmt: skip
            legend_done.add(str(run))
    small = max(style.font_size - 3, 9)
    fig.update_annotations(font={"size": small})  # the subplot titles
    fig.update_layout(
        template=style.template,
        height=rows * panel_height + 90,
        font={"size": small},  # sizes set here, not left to a template (ChartStyle.fonts says why)
        title={"text": title or "", "x": 0.0, "xanchor": "left", "font": {"size": style.font_size}},
        legend={"orientation": "h", "yanchor": "bottom", "y": 1.0 + 40 / (rows * panel_height), "x": 1.0,
                "xanchor": "right", "font": {"size": small}},
        hoverlabel={"font": {"size": small}},
        margin={"l": 45, "r": 15, "t": 80 if title else 60, "b": 45},
        hovermode="closest",
    )  # fmt: skip
    axis = {"tickfont": {"size": small - 1}, "title_font": {"size": small}}
    fig.update_xaxes(type="log" if log_x else "linear", showgrid=True, **axis)
    fig.update_yaxes(showgrid=True, nticks=4, **axis)
    x_title = X_LABELS.get(x, x) + (" (log)" if log_x else "")
    last_row = len(panels) - (rows - 1) * cols  # panels in the last row
    for c in range(1, cols + 1):
        # A column the last row leaves empty gets its tick labels and title one row up.
        bottom = rows if c <= last_row else rows - 1
        fig.update_xaxes(title_text=x_title, showticklabels=True, row=bottom, col=c)
    return fig


__all__ = [
    "DIVERGING_SCALE",
    "KIND_COLORS",
    "PALETTE",
    "PHASE_FILLS",
    "PHASE_SWATCHES",
    "SAMPLE_COLORS",
    "STEP_SCALE",
    "X_LABELS",
    "ChartStyle",
    "axis_label",
    "curves_figure",
    "ema",
    "empty_figure",
    "forecast_figure",
    "group_trends_figure",
    "learnt_figure",
    "loss_downstream_figure",
    "matched_loss_figure",
    "metric_vs_figure",
    "ranking_heatmap",
    "residual_figure",
    "run_colors",
    "sample_heatmap",
    "small_multiples_figure",
    "trajectory_figure",
    "wrap_text",
    "wrap_title",
]
