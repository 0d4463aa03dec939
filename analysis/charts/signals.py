"""The signal pages' figure (Geometry, Pathways, Compare): any metric (a flatness, routing or proxy signal)
against a downstream score, interpolated at the score's checkpoints, one line per run."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

from analysis.charts.pairs import _pairs_figure
from analysis.charts.style import ChartStyle, axis_label


def metric_vs_figure(
    frame: pd.DataFrame,
    metric: str,
    downstream_metric: str,
    *,
    x: str = "step",
    n_params: int | float | dict[str, float] | None = None,
    log_metric: bool = False,
    colors: dict[str, str] | None = None,
    style: ChartStyle | None = None,
    title: str | None = None,
) -> go.Figure:
    """Any metric (e.g. ``hessian_trace``) against a downstream score, one line per run, markers in run colour.

    The metric is interpolated at the downstream checkpoints (``divergence.align`` on ``x``); the hover
    shows the step. ``log_metric`` puts the metric on a log axis (non-positive values are then left out).
    """
    from analysis.divergence import align

    style = style or ChartStyle()
    aligned = align(frame, metric, downstream_metric, x=x, n_params=n_params)
    if log_metric:
        aligned = aligned[pd.to_numeric(aligned["left"], errors="coerce") > 0]
    fig = _pairs_figure(
        aligned,
        colors=colors,
        style=style,
        color_by_step=False,
        x_title=metric,
        y_title=downstream_metric,
        title=title or f"{downstream_metric} against {metric}",
    )
    if log_metric and fig.data:
        fig.update_xaxes(type="log", title_text=axis_label(f"{metric} (log)", style))
    return fig
