"""The Samples page's figures: which sample is right at which checkpoint, and how many are learnt for good at
each checkpoint."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from analysis.charts.style import PALETTE, ChartStyle, _layout, empty_figure

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
