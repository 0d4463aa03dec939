"""The Overview page's figure: one small panel per downstream task on a shared x-axis, one colour per run."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from analysis.charts.series import _band, _metric_rows
from analysis.charts.style import PALETTE, X_LABELS, ChartStyle, empty_figure, run_colors, wrap_text


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
    legend_done: set[str] = set()  # each run once in the legend, from the first panel it appears in
    for i, (panel, _, derived) in enumerate(panels):
        mine = _metric_rows(series.assign(metric=series["panel"]), panel, x, log_x)
        _panel_traces(fig, mine, panel, (i // cols + 1, i % cols + 1), x, derived, colors, legend_done, style)
    _small_multiples_layout(
        fig, style, rows=rows, cols=cols, n_panels=len(panels), panel_height=panel_height, x=x, log_x=log_x, title=title
    )
    return fig


def _panel_traces(
    fig: go.Figure,
    mine: pd.DataFrame,
    panel: str,
    cell: tuple[int, int],
    x: str,
    derived: bool,
    colors: dict[str, str],
    legend_done: set[str],
    style: ChartStyle,
) -> None:
    """Each run's line in the panel at ``cell`` (row, col), over its stderr band; dashed for a derived panel."""
    row, col = cell
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


def _small_multiples_layout(
    fig: go.Figure,
    style: ChartStyle,
    *,
    rows: int,
    cols: int,
    n_panels: int,
    panel_height: int,
    x: str,
    log_x: bool,
    title: str | None,
) -> None:
    """Small fonts, a legend above the panels, a shared x-axis titled under the bottom panel of each column."""
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
    last_row = n_panels - (rows - 1) * cols  # panels in the last row
    for c in range(1, cols + 1):
        # A column the last row leaves empty gets its tick labels and title one row up.
        bottom = rows if c <= last_row else rows - 1
        fig.update_xaxes(title_text=x_title, showticklabels=True, row=bottom, col=c)
