"""One series against another through the checkpoints: the scatter-with-lines figure behind the trajectory
(score against loss) and metric-against-score views, markers coloured by step or by run."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from analysis.charts.style import PALETTE, ChartStyle, _layout, empty_figure, run_colors

# Markers coloured by step: perceptually uniform and readable in grey.
STEP_SCALE = "Viridis"


def _aligned_label(aligned: pd.DataFrame, column: str, fallback: str) -> str:
    """The one name in ``aligned[column]`` (the metric of a side), or ``fallback`` when it holds none or several."""
    if column in aligned and len(aligned) and aligned[column].nunique() == 1:
        return str(aligned[column].iloc[0])
    return fallback


def _pairs_figure(
    aligned: pd.DataFrame,
    *,
    colors: dict[str, str] | None,
    style: ChartStyle,
    color_by_step: bool,
    x_title: str,
    y_title: str,
    title: str,
) -> go.Figure:
    """Right vs left of an aligned frame, one line per run; markers coloured by step or by run."""
    data = aligned.copy()
    for column in ("left", "right", "right_stderr", "step"):
        data[column] = pd.to_numeric(data[column], errors="coerce")
    data = data.dropna(subset=["left", "right"])
    if data.empty:
        return empty_figure(f"no checkpoints with both {x_title} and {y_title}", style)
    colors = colors or run_colors(data["run"])
    steps = data["step"].to_numpy(dtype=float)
    # Checkpoints are usually log-spaced: a log colour scale keeps the early ones distinguishable.
    log_steps = bool(np.isfinite(steps).all() and (steps > 0).all() and steps.max() / steps.min() > 100)
    fig = go.Figure()
    for run, group in data.groupby("run", sort=True):
        run = str(run)
        group = group.sort_values("x" if "x" in group else "step")
        color = colors.get(run, PALETTE[0])
        marker: dict = {"size": 9 if color_by_step else 8, "color": color, "line": {"color": color, "width": 1.5}}
        if color_by_step:
            step = group["step"].to_numpy(dtype=float)
            marker["color"] = np.log10(step) if log_steps else step
            marker["coloraxis"] = "coloraxis"
        err = group["right_stderr"].to_numpy(dtype=float)
        fig.add_trace(
            go.Scatter(
                x=group["left"].to_numpy(dtype=float),
                y=group["right"].to_numpy(dtype=float),
                mode="lines+markers" if len(group) > 1 else "markers",
                line={"color": color, "width": style.line_width},
                marker=marker,
                error_y={
                    "type": "data",
                    "array": np.nan_to_num(err),
                    "visible": bool(np.isfinite(err).any()),
                    "color": color,
                    "thickness": 1,
                },
                customdata=group["step"].to_numpy(dtype=float),
                name=run,
                legendgroup=run,
                hovertemplate=f"{run}<br>step %{{customdata:,.0f}}<br>{x_title} %{{x:.4g}}<br>"
                f"{y_title} %{{y:.4g}}<extra></extra>",
            )
        )
    _layout(fig, style, title=title, x_title=x_title, y_title=y_title, log_x=False, log_y=False)
    fig.update_layout(hovermode="closest")
    if color_by_step:
        fig.update_layout(coloraxis={"colorscale": STEP_SCALE, "colorbar": _step_colorbar(steps, log_steps)})
    return fig


def _step_colorbar(steps: np.ndarray, log_steps: bool) -> dict:
    """The step colour bar; on a log colour scale, its ticks at the powers of ten, labelled as steps."""
    colorbar: dict = {"title": {"text": "step"}}
    if log_steps:
        ticks = np.arange(np.floor(np.log10(steps.min())), np.ceil(np.log10(steps.max())) + 1)
        colorbar |= {"tickvals": ticks, "ticktext": [f"{10**t:,.0f}" for t in ticks]}
    return colorbar
