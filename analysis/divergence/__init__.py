"""Where pretraining loss stops predicting downstream ability: the statistics behind the Divergence page.

Every function takes the long table the store hands out (run, step, tokens, metric, value[, stderr]) or
the aligned frame ``align`` returns, and gives back a plain data frame. Conventions shared by all of them:

- **Checkpoint-level points.** Two series are compared at the x positions of the second ("right") series,
  which is the sparse one (downstream scores at checkpoints); the first ("left") series, often logged every
  step, is interpolated there, on log-x by default because checkpoints are usually log-spaced. Nothing is
  extrapolated: right-series points outside the left series' x range are left out.
- **Directions.** Every metric is oriented by :func:`analysis.directions.higher_is_better` (declared by its
  producer, registered, or read from its name): "improves" means "moves the better way".
- **One setting per series.** A series is a metric under one setting: a frame that holds one metric under
  two parameter sets (``params_hash``) is refused with a one-line error; pick one first with
  :func:`analysis.settings.select_settings`. Estimates that did not converge (``converged`` False) are left
  out unless ``include_unconverged``.
- **Missing values.** Rows whose value or x is missing are dropped before anything is computed; a missing
  stderr stays missing (``divergence_windows`` then estimates one from the series).
- **Claims carry their error rate.** Windows, change correlations and "beats the loss" are tested by the
  procedures of :mod:`analysis.significance`, whose false-positive rates and coverage are checked by
  simulation (tests/test_significance.py, ``python -m bench.calibration``).
- **Too few points** give an empty frame with the documented columns, never an exception.
- **Bad input** (an unknown metric, run or axis) raises a one-line ``ValueError`` saying what is available.

One module per concept, every public name importable from here: ``alignment`` (series side by side on
step, tokens or FLOPs), ``correlation``, ``windows`` (divergence windows), ``matched`` (matched-loss gaps
and residuals), ``ranking`` (predictor ranking), ``isotonic`` (monotone fits), ``frames`` (result columns
and input checks) and ``metric_roles`` (which metric is a loss, a score or a signal).
"""

from __future__ import annotations

from analysis.divergence.alignment import add_flops, align
from analysis.divergence.correlation import CORRELATION_NOTE, correlations, pearson, rankdata, spearman
from analysis.divergence.frames import (
    ALIGNED_COLUMNS,
    CORRELATION_COLUMNS,
    MATCHED_COLUMNS,
    POOLED,
    RANKING_COLUMNS,
    RESIDUAL_COLUMNS,
    WINDOW_COLUMNS,
    X_AXES,
)
from analysis.divergence.isotonic import isotonic_fit, pava
from analysis.divergence.matched import better_sign, last_residuals, matched_loss, residuals
from analysis.divergence.metric_roles import accuracy_first, downstream_metrics, loss_metrics, signal_metrics
from analysis.divergence.ranking import predictor_ranking, ranking_verdict, within_runs
from analysis.divergence.windows import (
    TOL_OF,
    divergence_windows,
    flat_tolerance,
    flat_words,
    scatter_stderr,
    window_sentences,
    windows_caption,
)

__all__ = [
    "ALIGNED_COLUMNS",
    "CORRELATION_COLUMNS",
    "CORRELATION_NOTE",
    "MATCHED_COLUMNS",
    "POOLED",
    "RANKING_COLUMNS",
    "RESIDUAL_COLUMNS",
    "TOL_OF",
    "WINDOW_COLUMNS",
    "X_AXES",
    "accuracy_first",
    "add_flops",
    "align",
    "better_sign",
    "correlations",
    "divergence_windows",
    "downstream_metrics",
    "flat_tolerance",
    "flat_words",
    "isotonic_fit",
    "last_residuals",
    "loss_metrics",
    "matched_loss",
    "pava",
    "pearson",
    "predictor_ranking",
    "rankdata",
    "ranking_verdict",
    "residuals",
    "scatter_stderr",
    "signal_metrics",
    "spearman",
    "window_sentences",
    "windows_caption",
    "within_runs",
]
