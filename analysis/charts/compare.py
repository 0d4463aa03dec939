"""The Compare page's figures: each run's downstream score at common loss levels, and each checkpoint's
distance from the score that one line fitted on loss predicts (the residual)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from analysis.charts.style import PALETTE, X_LABELS, ChartStyle, _layout, empty_figure, run_colors


def matched_loss_figure(
    matched: pd.DataFrame,
    *,
    colors: dict[str, str] | None = None,
    style: ChartStyle | None = None,
    reverse_loss: bool = True,
    title: str | None = None,
) -> go.Figure:
    """Each run's downstream score at common loss levels (``divergence.matched_loss``), ±1 stderr bars.

    One line per run in its colour; the hover gives the gap to the reference run with its stderr. With
    ``reverse_loss`` the loss axis runs from high to low (training order).
    """
    style = style or ChartStyle()
    data = matched.dropna(subset=["loss_level", "downstream"]) if len(matched) else matched
    if not len(data):
        return empty_figure("no loss level that every run reached", style)
    colors = colors or run_colors(data["run"])
    reference = str(data["reference"].iloc[0]) if "reference" in data else ""
    fig = go.Figure()
    for run in dict.fromkeys(data["run"].astype(str)):  # the reference first, as matched_loss orders them
        group = data[data["run"].astype(str) == run].sort_values("loss_level")
        color = colors.get(run, PALETTE[0])
        err = pd.to_numeric(group["stderr"], errors="coerce").to_numpy(dtype=float)
        gap = np.stack([group["gap"].to_numpy(dtype=float), group["gap_stderr"].to_numpy(dtype=float)], axis=1)
        fig.add_trace(
            go.Scatter(
                x=group["loss_level"].to_numpy(dtype=float),
                y=group["downstream"].to_numpy(dtype=float),
                mode="lines+markers" if len(group) > 1 else "markers",
                line={"color": color, "width": style.line_width},
                marker={"color": color, "size": 8},
                error_y={
                    "type": "data",
                    "array": np.nan_to_num(err),
                    "visible": bool(np.isfinite(err).any()),
                    "color": color,
                    "thickness": 1.5,
                },
                customdata=gap,
                name=run + (" (reference)" if run == reference else ""),
                legendgroup=run,
                hovertemplate=f"{run}<br>loss %{{x:.4g}}<br>score %{{y:.4g}}<br>"
                f"gap vs {reference} %{{customdata[0]:+.4f}} ± %{{customdata[1]:.4f}}<extra></extra>",
            )
        )
    _layout(
        fig,
        style,
        title=title or "downstream at matched loss",
        x_title="loss level",
        y_title="downstream score",
        log_x=False,
        log_y=False,
    )
    fig.update_layout(hovermode="closest")
    if reverse_loss:
        fig.update_xaxes(autorange="reversed", title_text="loss level (falling →)")
    return fig


def residual_figure(
    residual: pd.DataFrame,
    *,
    x: str = "step",
    log_x: bool = True,
    colors: dict[str, str] | None = None,
    style: ChartStyle | None = None,
    title: str | None = None,
) -> go.Figure:
    """How much better (above 0) or worse each checkpoint is downstream than its loss predicts.

    ``residual`` is ``divergence.residuals``: one straight line of score on loss fitted to every run's
    checkpoints pooled; the y-axis is score minus that line, against the aligned x (step, tokens or
    FLOPs). A run above the zero line does more with the same loss. The hover gives loss, score and
    the line's prediction.
    """
    style = style or ChartStyle()
    data = residual.dropna(subset=["x", "residual"]) if len(residual) else residual
    if log_x and len(data):
        data = data[data["x"] > 0]
    if not len(data):
        return empty_figure("too few checkpoints with both a loss and a score to fit a line", style)
    colors = colors or run_colors(data["run"])
    fig = go.Figure()
    for run, group in data.groupby("run", sort=True):
        run = str(run)
        group = group.sort_values("x")
        color = colors.get(run, PALETTE[0])
        fig.add_trace(
            go.Scatter(
                x=group["x"].to_numpy(dtype=float),
                y=group["residual"].to_numpy(dtype=float),
                mode="lines+markers" if len(group) > 1 else "markers",
                line={"color": color, "width": style.line_width},
                marker={"color": color, "size": 7},
                customdata=group[["step", "loss", "downstream", "fitted"]].to_numpy(dtype=float),
                name=run,
                hovertemplate=f"{run} step %{{customdata[0]:.0f}}<br>loss %{{customdata[1]:.4g}}, "
                "score %{customdata[2]:.4g}<br>the line predicts %{customdata[3]:.4g}: "
                "residual %{y:+.4f}<extra></extra>",
            )
        )
    fig.add_hline(y=0.0, line={"color": "#59636e", "width": 1, "dash": "dot"})
    slope, intercept = float(data["slope"].iloc[0]), float(data["intercept"].iloc[0])
    _layout(
        fig,
        style,
        title=title or f"score minus what loss predicts (score = {intercept:.3g} {slope:+.3g} · loss, all runs)",
        x_title=X_LABELS.get(x, x) + (" (log)" if log_x else ""),
        y_title="residual (above 0: better than loss says)"
        if residual.attrs.get("higher_is_better", True)
        else "residual (below 0: better than loss says)",
        log_x=log_x,
        log_y=False,
    )
    fig.update_layout(hovermode="closest")
    return fig
