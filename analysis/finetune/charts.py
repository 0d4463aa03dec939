"""Figures of the Fine-tune page: long tables in, Plotly figures out (the style of analysis.charts)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from analysis.charts import PALETTE, X_LABELS, ChartStyle, _layout, empty_figure, run_colors
from analysis.finetune import FINETUNE


def _series(frame: pd.DataFrame, metric: str, x: str) -> pd.DataFrame:
    data = frame[frame["metric"] == metric]
    return data.dropna(subset=[x, "value"]).sort_values(x) if x in data else data.iloc[0:0]


def prepost_figure(
    frame: pd.DataFrame,
    task: str,
    *,
    windows: pd.DataFrame | None = None,
    x: str = "step",
    log_x: bool = False,
    log_y: bool = False,
    colors: dict[str, str] | None = None,
    style: ChartStyle | None = None,
    score_label: str = "score",
) -> go.Figure:
    """The task's score before (dashed) and after (solid) fine-tuning across checkpoints, one colour per run.

    Error bars are +-1 stderr; ``windows`` (``overtraining_windows``) are shaded in their run's colour.
    """
    style = style or ChartStyle()
    pre_m, post_m = f"{FINETUNE}/{task}/pre", f"{FINETUNE}/{task}/post"
    data = frame[frame["metric"].isin([pre_m, post_m])]
    if data.empty or x not in data or data[x].isna().all():
        return empty_figure(f"no fine-tune results for {task}", style)
    colors = colors or run_colors(data["run"])
    fig = go.Figure()
    for run in sorted(data["run"].astype(str).unique()):
        color = colors.get(run, PALETTE[0])
        for metric, dash, label in ((pre_m, "dash", "before"), (post_m, "solid", "after")):
            s = _series(data[data["run"].astype(str) == run], metric, x)
            if s.empty:
                continue
            err = s["stderr"].fillna(0.0).to_numpy(dtype=float) if "stderr" in s else None
            fig.add_trace(
                go.Scatter(
                    x=s[x], y=s["value"], mode="lines+markers", name=f"{run}, {label} fine-tuning",
                    line={"color": color, "dash": dash, "width": style.line_width},
                    error_y={"type": "data", "array": err, "visible": err is not None, "thickness": 1},
                )
            )  # fmt: skip
    for w in (windows if windows is not None else pd.DataFrame()).itertuples():
        fig.add_vrect(x0=w.start, x1=w.end, fillcolor=colors.get(str(w.run), PALETTE[0]), opacity=0.15, line_width=0)
    title = f"{task}: {score_label} before and after fine-tuning"
    return _layout(fig, style, title=title, x_title=X_LABELS[x], y_title=score_label, log_x=log_x, log_y=log_y)


def effects_figure(
    frame: pd.DataFrame,
    task: str,
    *,
    x: str = "step",
    log_x: bool = False,
    colors: dict[str, str] | None = None,
    style: ChartStyle | None = None,
) -> go.Figure:
    """Three panels across checkpoints: the gain (post - pre), the held-out loss change (forgetting, per
    domain) and the other tasks' score changes; +-1 stderr bars, a zero line in each."""
    style = style or ChartStyle()
    scope = f"{FINETUNE}/{task}/"
    data = frame[frame["metric"].astype(str).str.startswith(scope)]
    if data.empty or x not in data:
        return empty_figure(f"no fine-tune results for {task}", style)
    colors = colors or run_colors(data["run"])
    leaf = data["metric"].astype(str).str.slice(len(scope))
    panels = [
        ("gain (after - before)", leaf == "gain"),
        ("held-out loss change (forgetting)", leaf.str.startswith("forgetting_")),
        ("other tasks' change", leaf.str.startswith("change:")),
    ]
    fig = make_subplots(rows=1, cols=3, subplot_titles=[p[0] for p in panels], horizontal_spacing=0.07)
    shown: set[str] = set()
    for col, (_, mask) in enumerate(panels, start=1):
        for (run, metric), s in data[mask].groupby(["run", "metric"], sort=True):
            s = s.dropna(subset=[x, "value"]).sort_values(x)
            what = str(metric)[len(scope) :]
            dash = "solid" if what in ("gain",) or what.endswith("heldout") else "dot"
            err = s["stderr"].fillna(0.0).to_numpy(dtype=float)
            fig.add_trace(
                go.Scatter(
                    x=s[x], y=s["value"], mode="lines+markers", name=f"{run}: {what}",
                    line={"color": colors.get(str(run), PALETTE[0]), "dash": dash, "width": style.line_width},
                    error_y={"type": "data", "array": err, "thickness": 1}, legendgroup=str(run),
                    showlegend=True,
                ),
                row=1, col=col,
            )  # fmt: skip
            shown.add(str(run))
        fig.add_hline(y=0.0, line={"color": "#888", "width": 1}, row=1, col=col)
    fig = _layout(
        fig, style, title=f"{task}: what fine-tuning changed", x_title="", y_title="", log_x=False, log_y=False
    )
    fig.update_xaxes(title_text=X_LABELS[x], type="log" if log_x else "linear")
    legend = {"orientation": "h", "yanchor": "top", "y": -0.22, "xanchor": "left", "x": 0.0}
    fig.update_layout(hovermode="closest", height=style.height + 100, legend=legend, margin={"b": 140})
    return fig


def sensitivity_figure(
    frame: pd.DataFrame,
    task: str,
    *,
    metric: str = "perturbation_sensitivity",
    colors: dict[str, str] | None = None,
    style: ChartStyle | None = None,
) -> go.Figure:
    """The proxy against the real thing: each checkpoint's ``metric`` (x) against its post-fine-tuning score
    (y), one colour per run, points joined in training order; Spearman's rho per run in the legend."""
    style = style or ChartStyle()
    post_m = f"{FINETUNE}/{task}/post"
    data = frame[frame["metric"].isin([metric, post_m])]
    wide = data.pivot_table(index=["run", "step"], columns="metric", values="value", aggfunc="first")
    if metric not in wide or post_m not in wide:
        return empty_figure(f"no {metric} cached at the fine-tuned checkpoints", style)
    wide = wide.dropna(subset=[metric, post_m]).reset_index()
    if wide.empty:
        return empty_figure(f"no checkpoint has both {metric} and a fine-tune result", style)
    colors = colors or run_colors(wide["run"])
    fig = go.Figure()
    for run, g in wide.groupby("run", sort=True):
        g = g.sort_values("step")
        rho = g[metric].rank().corr(g[post_m].rank()) if len(g) > 2 else np.nan
        label = f"{run} (Spearman {rho:+.2f})" if np.isfinite(rho) else str(run)
        fig.add_trace(
            go.Scatter(
                x=g[metric], y=g[post_m], mode="lines+markers", name=label, text=[f"step {s}" for s in g["step"]],
                line={"color": colors.get(str(run), PALETTE[0]), "width": style.line_width},
            )
        )  # fmt: skip
    title = f"{metric} vs the score after fine-tuning"
    return _layout(
        fig, style, title=title, x_title=metric, y_title=f"{task} after fine-tuning", log_x=False, log_y=False
    )
