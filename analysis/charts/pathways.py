"""The Pathways page's figure: a metric (pathway distance, consistency, loss) inside each group of samples
memorised at the same step, one line per group."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from analysis.charts.series import _band
from analysis.charts.style import PALETTE, ChartStyle, _layout, empty_figure


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
