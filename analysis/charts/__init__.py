"""Plotly figures from data frames. No Streamlit here: the same figures go into reports.

Every figure takes long-form frames (run, step, tokens, metric, value[, stderr]) and a
``ChartStyle``; run colours come from one colour-blind-safe palette, assigned by the sorted
run names, so a run has the same colour on every page and in every report.

The figures live in one module per page that shows them; this package re-exports every public name, so
``from analysis.charts import curves_figure`` is the way to import them:

    style       palette, axis names, ChartStyle (projector sizes), text wrapping, the shared layout, empty figure
    series      EMA smoothing, one metric's rows, the ±1 stderr band
    curves      Runs: one metric against step, tokens or FLOPs
    divergence  Divergence: loss above downstream (windows, lr phases), trajectory, the predictor ranking
    pairs       one series against another through the checkpoints (behind trajectory and metric-vs-score)
    signals     signal pages: any metric against a downstream score
    compare     Compare: downstream at matched loss, the residual of downstream on loss
    samples     Samples: right/wrong per sample and checkpoint, samples learnt per checkpoint
    pathways    Pathways: a metric inside each memorisation group
    forecast    Forecast: measured score, fitted curve, forecasts with intervals
    overview    Overview: small multiples, one panel per task
"""

from __future__ import annotations

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
from analysis.charts.forecast import forecast_figure
from analysis.charts.overview import small_multiples_figure
from analysis.charts.pairs import STEP_SCALE
from analysis.charts.pathways import group_trends_figure
from analysis.charts.samples import SAMPLE_COLORS, learnt_figure, sample_heatmap
from analysis.charts.series import ema
from analysis.charts.signals import metric_vs_figure
from analysis.charts.style import (
    PALETTE,
    X_LABELS,
    ChartStyle,
    axis_label,
    empty_figure,
    run_colors,
    wrap_text,
    wrap_title,
)

# The shared layout, for figures drawn outside this package in the same look (analysis.finetune.charts).
from analysis.charts.style import _layout as _layout

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
