"""The shape of the divergence tables: x axes, the columns of every result, and checks on the input table.

Every analysis takes the long table the store hands out (run, step, tokens, metric, value[, stderr]) and
returns a frame with one of the column lists below; an analysis with too little data returns
:func:`empty_frame` of its columns. The checks raise one-line ``ValueError``s that name what is available.
"""

from __future__ import annotations

from collections.abc import Iterable

import pandas as pd

X_AXES = ("step", "tokens", "flops")
POOLED = "(pooled)"

ALIGNED_COLUMNS = [
    "run", "x", "step", "tokens", "left_metric", "right_metric", "left", "left_stderr", "right", "right_stderr",
]  # fmt: skip
CORRELATION_COLUMNS = [
    "run", "downstream", "n", "spearman", "change_spearman", "change_lo", "change_hi", "change_p", "pearson",
    "n_effective",
]  # fmt: skip
WINDOW_COLUMNS = [
    "run", "kind", "start", "end", "downstream_change", "change_lo", "change_hi", "p_adjusted", "z_score",
    "n_points", "loss_change", "loss_range", "n_spans", "stderr_source",
]  # fmt: skip
MATCHED_COLUMNS = ["loss_level", "run", "downstream", "stderr", "reference", "gap", "gap_stderr"]
RESIDUAL_COLUMNS = [
    "run", "x", "step", "tokens", "loss", "downstream", "fitted", "residual", "intercept", "slope",
    "run_fitted", "run_residual", "run_intercept", "run_slope",
]  # fmt: skip
RANKING_COLUMNS = [
    "run", "predictor", "downstream", "n", "spearman", "abs_spearman", "sign", "loo_rmse", "loo_r2", "is_loss",
    "beats_loss_p", "beats_loss",
]  # fmt: skip


_TEXT_COLUMNS = {"run", "kind", "predictor", "downstream", "left_metric", "right_metric", "reference"}


def empty_frame(columns: list[str]) -> pd.DataFrame:
    """A frame with no rows and the given columns (text columns as object, the rest as float)."""
    return pd.DataFrame({c: pd.Series(dtype=object if c in _TEXT_COLUMNS else float) for c in columns})


def available(names: Iterable[object]) -> str:
    """The distinct names, sorted, for an error message: the first 30 and how many in all, or "(none)"."""
    distinct = sorted({str(n) for n in names})
    shown = ", ".join(distinct[:30])
    return shown + (f", ... ({len(distinct)} in all)" if len(distinct) > 30 else "") if distinct else "(none)"


def check_frame(frame: pd.DataFrame) -> None:
    """Refuse anything but a long table with at least run, step, metric and value columns."""
    if not isinstance(frame, pd.DataFrame):
        raise ValueError(f"expected a pandas DataFrame, got {type(frame).__name__}")
    missing = [c for c in ("run", "step", "metric", "value") if c not in frame.columns]
    if missing:
        raise ValueError(
            f"frame lacks column(s) {', '.join(missing)}: pass the long table "
            "(run, step, tokens, metric, value, stderr)"
        )


def check_metric(frame: pd.DataFrame, metric: str) -> None:
    """Refuse a metric the long table does not hold, naming the ones it does."""
    if not (frame["metric"] == metric).any():
        raise ValueError(f"metric {metric!r} not in the data; available: {available(frame['metric'].unique())}")


def check_x(x: str) -> None:
    """Refuse an x axis other than step, tokens or flops."""
    if x not in X_AXES:
        raise ValueError(f"x-axis {x!r}: choose one of {', '.join(X_AXES)}")
