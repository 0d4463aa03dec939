"""Plotly figures from data frames. No Streamlit here: the same figures go into reports.

Every figure takes long-form frames (run, step, tokens, metric, value[, stderr]) and a
``ChartStyle``; run colours come from one colour-blind-safe palette, assigned by the sorted
run names, so a run has the same colour on every page and in every report.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import plotly.graph_objects as go

# Okabe & Ito's palette: distinguishable under the common colour-vision deficiencies.
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000"]

X_LABELS = {"step": "step", "tokens": "tokens seen", "flops": "FLOPs"}


@dataclass(frozen=True)
class ChartStyle:
    """How figures look. ``large`` is for projectors: bigger fonts and thicker lines."""

    large: bool = False
    height: int = 420
    template: str = "plotly_white"

    def __post_init__(self) -> None:
        if self.height < 100:
            raise ValueError(f"ChartStyle.height={self.height}: use at least 100 pixels")

    @property
    def font_size(self) -> int:
        return 20 if self.large else 13

    @property
    def line_width(self) -> float:
        return 3.5 if self.large else 2.0


def run_colors(runs: list[str] | pd.Series) -> dict[str, str]:
    """A stable run -> colour map (sorted names, cycling through the palette)."""
    names = sorted({str(r) for r in runs})
    return {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(names)}


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


def _layout(fig: go.Figure, style: ChartStyle, *, title: str, x_title: str, y_title: str, log_x: bool, log_y: bool):
    fig.update_layout(
        template=style.template,
        height=style.height,
        title={"text": title, "x": 0.0, "xanchor": "left"},
        font={"size": style.font_size},
        hovermode="x unified",
        showlegend=True,
        legend={"orientation": "h", "yanchor": "bottom", "y": 1.02, "xanchor": "right", "x": 1.0},
        margin={"l": 60, "r": 20, "t": 70, "b": 50},
    )
    fig.update_xaxes(title_text=x_title, type="log" if log_x else "linear", showgrid=True)
    fig.update_yaxes(title_text=y_title, type="log" if log_y else "linear", showgrid=True)
    return fig


def empty_figure(message: str, style: ChartStyle | None = None) -> go.Figure:
    """A blank figure that says why it is blank."""
    style = style or ChartStyle()
    fig = go.Figure()
    fig.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
    fig.update_layout(template=style.template, height=style.height, font={"size": style.font_size})
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return fig


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
    for run, group in data.groupby("run", sort=True):
        group = group.sort_values(x)
        color = colors.get(str(run), PALETTE[0])
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
            fig.add_trace(
                go.Scatter(
                    x=xs,
                    y=ys,
                    mode=mode,
                    line={"color": color, "width": 1},
                    opacity=0.3,
                    showlegend=False,
                    legendgroup=str(run),
                    name=f"{run} (raw)",
                    hovertemplate="%{y:.4g}<extra>" + f"{run} raw</extra>",
                )
            )
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
    return _layout(
        fig,
        style,
        title=title or metric,
        x_title=X_LABELS[x] + (" (log)" if log_x else ""),
        y_title=metric,
        log_x=log_x,
        log_y=log_y,
    )
