"""The Divergence page's figures: loss above a downstream score on one shared x-axis (divergence windows
and learning-rate phases shaded), the score-against-loss trajectory, and the heatmap ranking which signal
predicts downstream."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from analysis.charts.pairs import _aligned_label, _pairs_figure
from analysis.charts.series import _band, _metric_rows, _raw, ema
from analysis.charts.style import PALETTE, X_LABELS, ChartStyle, _layout, _rgba, axis_label, empty_figure, run_colors

# Window shading by kind: bluish green for grokking (downstream rising), vermillion for inverse (falling).
KIND_COLORS = {"grokking": "#009E73", "inverse": "#D55E00"}

# ColorBrewer's RdBu: diverging and colour-blind safe; negative correlations red, positive blue.
DIVERGING_SCALE = "RdBu"

# Learning-rate phases: greys, lighter than any window, so a window drawn over a decay stays readable. The legend
# swatch is the same grey, opaque (a 10% fill would not show at marker size).
PHASE_FILLS = {"warmup": "rgba(120,120,120,0.07)", "decay": "rgba(60,60,60,0.10)"}
PHASE_SWATCHES = {"warmup": "#e4e4e4", "decay": "#c8c8c8"}


def _phase_bands(phases: pd.DataFrame | None, xs: np.ndarray) -> tuple[list[dict], list[go.Scatter]]:
    """Shaded warmup and decay spans of each run (both rows) and one legend entry per band ("lr decay · run").

    Named in the legend rather than inside the plot: a warmup is often a sliver at the left edge, where text
    would be cut or sit on the curves. Spans are clipped to the plotted x values ``xs``: Plotly widens an
    autoranged axis to fit its shapes, and a warmup from step 0 has no place on a log axis.
    """
    shapes: list[dict] = []
    keys: list[go.Scatter] = []
    xs = xs[np.isfinite(xs)]
    if phases is None or not len(phases) or not len(xs):
        return shapes, keys
    # Runs that share a schedule share one band and one legend entry naming them all.
    spans = phases.astype({"run": str}).groupby(["phase", "start", "end"], sort=False)["run"].agg(", ".join)
    for (phase, start, end), runs in spans.items():
        fill = PHASE_FILLS.get(str(phase))
        start, end = max(float(start), xs.min()), min(float(end), xs.max())
        if fill is None or not end > start:
            continue
        for xref, yref in (("x", "y domain"), ("x2", "y2 domain")):
            shapes.append({"type": "rect", "xref": xref, "yref": yref, "x0": start, "x1": end, "y0": 0, "y1": 1,
                           "fillcolor": fill, "line": {"width": 0}, "layer": "below"})  # fmt: skip
        swatch = {"symbol": "square", "size": 14, "color": PHASE_SWATCHES[str(phase)]}
        keys.append(go.Scatter(x=[None], y=[None], mode="markers", name=f"lr {phase} · {runs}", marker=swatch))
    return shapes, keys


def loss_downstream_figure(
    frame: pd.DataFrame,
    loss_metric: str,
    downstream_metric: str,
    *,
    x: str = "step",
    smoothing: float = 0.0,
    log_x: bool = False,
    colors: dict[str, str] | None = None,
    style: ChartStyle | None = None,
    windows: pd.DataFrame | None = None,
    phases: pd.DataFrame | None = None,
    title: str | None = None,
) -> go.Figure:
    """Loss (top) and a downstream score (bottom) on one shared x-axis, one colour per run.

    Smoothing (EMA) applies to the loss row only, drawn over the faint raw curve; downstream points are
    checkpoints and are drawn as measured, with a ±1 stderr band. ``windows`` (the output of
    ``divergence.divergence_windows``: run, kind, start, end) are shaded on both rows in the colour of their
    kind and labelled "kind · run" on the top row. ``phases`` (``schedule.run_phases`` on the same x-axis)
    shade each run's learning-rate warmup and decay in light grey on both rows, named in the legend
    ("lr decay · run"); the stable phase is left unshaded. For ``x="flops"`` the frame needs a ``flops``
    column (``divergence.add_flops``).
    """
    from plotly.subplots import make_subplots

    style = style or ChartStyle()
    if x not in X_LABELS:
        raise ValueError(f"x-axis {x!r}: choose one of {', '.join(X_LABELS)}")
    loss = _metric_rows(frame, loss_metric, x, log_x)
    score = _metric_rows(frame, downstream_metric, x, log_x)
    if loss.empty and score.empty:
        return empty_figure(f"no {X_LABELS[x]} values for {loss_metric} or {downstream_metric}", style)
    colors = colors or run_colors(pd.concat([loss["run"], score["run"]]))
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.06)
    shown: set[str] = set()  # runs already in the legend: each appears once, from the top row
    _row_traces(fig, 1, loss, loss_metric, x=x, smoothing=smoothing, colors=colors, shown=shown, style=style)
    _row_traces(fig, 2, score, downstream_metric, x=x, smoothing=0.0, colors=colors, shown=shown, style=style)
    xs_all = pd.concat([loss[x], score[x]]).to_numpy(dtype=float)
    shapes = _window_shapes(windows, xs_all, log_x=log_x, style=style)
    bands, keys = _phase_bands(phases, xs_all)
    shapes += bands
    for key in keys:
        fig.add_trace(key, 1, 1)
    if shapes:
        fig.update_layout(shapes=shapes)
    _layout(
        fig,
        style,
        title=title or f"{loss_metric} and {downstream_metric}",
        x_title=X_LABELS[x] + (" (log)" if log_x else ""),
        y_title="",
        log_x=log_x,
        log_y=False,
    )
    fig.update_layout(height=int(style.height * 1.6))
    fig.update_xaxes(title_text="", row=1, col=1)
    fig.update_yaxes(title_text=axis_label(loss_metric, style), row=1, col=1)
    fig.update_yaxes(title_text=axis_label(downstream_metric, style), row=2, col=1)
    return fig


def _row_traces(
    fig: go.Figure,
    row: int,
    data: pd.DataFrame,
    metric: str,
    *,
    x: str,
    smoothing: float,
    colors: dict[str, str],
    shown: set[str],
    style: ChartStyle,
) -> None:
    """Each run's ``metric`` line on ``row`` (1: loss, 2: downstream, whose points are joined markers), over its
    stderr band and, when smoothed, its faint raw curve; a run already in ``shown`` stays out of the legend."""
    for run, group in data.groupby("run", sort=True):
        run = str(run)
        group = group.sort_values(x)
        color = colors.get(run, PALETTE[0])
        xs, ys = group[x].to_numpy(dtype=float), group["value"].to_numpy(dtype=float)
        mode = "lines" if len(group) > 1 else "markers"  # a one-point line would be invisible
        if row == 2 and len(group) > 1:
            mode = "lines+markers"
        if group["stderr"].notna().any():
            fig.add_trace(_band(xs, ys, group["stderr"].fillna(0.0).to_numpy(dtype=float), color, run), row, 1)
        if smoothing > 0:
            fig.add_trace(_raw(xs, ys, mode, color, run, hover=False), row, 1)
            ys = ema(ys, smoothing)
        fig.add_trace(
            go.Scatter(
                x=xs,
                y=ys,
                mode=mode,
                line={"color": color, "width": style.line_width},
                marker={"color": color, "size": 7 if row == 2 else 8},
                name=run,
                legendgroup=run,
                showlegend=run not in shown,
                hovertemplate="%{y:.4g}<extra>" + f"{run} {metric}</extra>",
            ),
            row,
            1,
        )
        shown.add(run)


def _window_shapes(windows: pd.DataFrame | None, xs_all: np.ndarray, *, log_x: bool, style: ChartStyle) -> list[dict]:
    """One rectangle per divergence window on each row, in its kind's colour, labelled "kind · run" on the top row.

    ``xs_all`` are the plotted x values, whose span decides which windows count as narrow.
    """
    # Labels of windows that may overlap take turns at the rectangle's corners. The shapes are set in
    # one layout update: ``add_vrect`` re-validates the whole layout per call (~3 ms each, bench/render.py).
    # A window narrower than a tenth of the x-range gets its label written up along its middle instead.
    corners = ["top left", "top right", "bottom left", "bottom right"]
    shapes: list[dict] = []
    scale = np.log10 if log_x else (lambda v: v)
    x_range = float(np.ptp(scale(xs_all))) if len(xs_all) > 1 else 0.0
    for i, w in enumerate((windows if windows is not None else pd.DataFrame()).itertuples(index=False)):
        start, end = float(w.start), float(w.end)
        if log_x and min(start, end) <= 0:
            continue
        kind = str(w.kind)
        fill = _rgba(KIND_COLORS.get(kind, "#999999"), 0.16)
        narrow = x_range > 0 and abs(float(scale(end) - scale(start))) < 0.1 * x_range
        label = {
            "text": f"{kind} · {w.run}",
            "textposition": "middle center" if narrow else corners[i % 4],
            "textangle": -90 if narrow else 0,
            "font": {"size": style.font_size - 2, "color": KIND_COLORS.get(kind, "#555555")},
        }
        for xref, yref in (("x", "y domain"), ("x2", "y2 domain")):
            shape = {"type": "rect", "xref": xref, "yref": yref, "x0": start, "x1": end, "y0": 0, "y1": 1,
                     "fillcolor": fill, "line": {"width": 0}, "layer": "below"}  # fmt: skip
            shapes.append(shape | ({"label": label} if xref == "x" else {}))
    return shapes


def trajectory_figure(
    aligned: pd.DataFrame,
    *,
    colors: dict[str, str] | None = None,
    style: ChartStyle | None = None,
    reverse_loss: bool = True,
    title: str | None = None,
) -> go.Figure:
    """Downstream score against loss, one line per run through its checkpoints in training order.

    Takes ``divergence.align(frame, loss_metric, downstream_metric)``. Lines are in run colours; markers are
    coloured by step (Viridis, on a log scale when the steps span more than two decades), the hover shows
    the step. With ``reverse_loss`` (default) the loss axis runs from high to low, so training moves left
    to right; a vertical stretch of a line is downstream improving at constant loss.
    """
    style = style or ChartStyle()
    loss = _aligned_label(aligned, "left_metric", "loss")
    score = _aligned_label(aligned, "right_metric", "downstream")
    fig = _pairs_figure(
        aligned,
        colors=colors,
        style=style,
        color_by_step=True,
        x_title=loss,
        y_title=score,
        title=title or f"{score} against {loss}",
    )
    if reverse_loss and fig.data:
        fig.update_xaxes(autorange="reversed", title_text=axis_label(f"{loss} (falling →)", style))
    return fig


def ranking_heatmap(
    ranking: pd.DataFrame,
    *,
    style: ChartStyle | None = None,
    title: str | None = None,
) -> go.Figure:
    """Predictors (rows) by downstream metrics (columns), coloured by signed Spearman in [-1, 1].

    Takes ``divergence.predictor_ranking`` output, several downstream metrics concatenated; when it has
    pooled rows only those are drawn. Rows are ordered by their strongest |Spearman|, strongest on top;
    each cell is annotated with rho and n; the loss baseline is marked "(loss)". The colour scale is
    ColorBrewer RdBu (diverging, colour-blind safe) centred on 0, blue for positive.
    """
    from analysis.divergence import POOLED

    style = style or ChartStyle()
    data = ranking
    if len(data) and "run" in data and (data["run"] == POOLED).any():
        data = data[data["run"] == POOLED]
    data = data.dropna(subset=["spearman"]) if len(data) else data
    if not len(data):
        return empty_figure("no predictor with enough checkpoints to rank", style)
    rho, text = _spearman_cells(data)
    fig = go.Figure(
        go.Heatmap(
            z=rho.to_numpy(dtype=float),
            x=[str(c) for c in rho.columns],
            y=[str(i) for i in rho.index],
            zmin=-1.0,
            zmax=1.0,
            zmid=0.0,
            colorscale=DIVERGING_SCALE,
            colorbar={"title": {"text": "Spearman"}},
            text=text,
            texttemplate="%{text}",
            textfont={"size": max(style.font_size - 2, 9)},
            hovertemplate="%{y} → %{x}<br>Spearman %{z:+.3f}<extra></extra>",
            xgap=2,
            ygap=2,
        )
    )
    _layout(
        fig,
        style,
        title=title or "which signal predicts downstream",
        x_title="downstream",
        y_title="",
        log_x=False,
        log_y=False,
    )
    fig.update_layout(
        hovermode="closest",
        showlegend=False,
        height=max(style.height, 60 + (style.font_size * 3) * len(rho.index) + 120),
    )
    fig.update_yaxes(type="category", autorange="reversed", showgrid=False)
    fig.update_xaxes(type="category", showgrid=False, side="bottom")
    return fig


def _spearman_cells(data: pd.DataFrame) -> tuple[pd.DataFrame, list[list[str]]]:
    """Spearman's rho as a predictor-by-downstream table, strongest row first, and each cell's "rho, n" text
    (blank where the pair was not ranked)."""
    data = data.copy()
    loss_names = set(data.loc[data["is_loss"].astype(bool), "predictor"]) if "is_loss" in data else set()
    data["label"] = [p + (" (loss)" if p in loss_names else "") for p in data["predictor"]]
    rho = data.pivot_table(index="label", columns="downstream", values="spearman", aggfunc="mean")
    n = data.pivot_table(index="label", columns="downstream", values="n", aggfunc="max").reindex_like(rho)
    order = rho.abs().max(axis=1).sort_values(ascending=False).index
    rho, n = rho.loc[order], n.loc[order]
    text = [
        ["" if not np.isfinite(r) else f"{r:+.2f}<br>n={int(k)}" for r, k in zip(rr, nn, strict=True)]
        for rr, nn in zip(rho.to_numpy(dtype=float), n.to_numpy(dtype=float), strict=True)
    ]
    return rho, text
