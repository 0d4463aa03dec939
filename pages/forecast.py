"""Forecast: fit a run's early checkpoints, predict later ones with prediction intervals, and backtest by hiding
the end of the run."""

from __future__ import annotations

import numpy as np
import streamlit as st

from analysis import divergence as dv
from analysis import forecast as fc
from analysis.charts import X_LABELS, forecast_figure
from pages import _state

sel = _state.selection()
st.title("Forecast")
_state.require_runs(sel)

frame = _state.long_table(sel.runs)
names = _state.metric_names(frame)
scores, losses = dv.downstream_metrics(names), dv.loss_metrics(names)
if not scores:
    st.warning("The selected runs have no downstream score yet: evaluate or import some checkpoints first.")
    st.stop()

c1, c2, c3, c4 = st.columns([2, 3, 2, 3])
run = c1.selectbox("Run", list(sel.runs), key="fc_run", bind="query-params")
score = _state.metric_picker(c2, "Score", scores, _state.accuracy_first(scores), "score")
method = c3.selectbox("Form", list(fc.METHODS), key="method", bind="query-params")
through = losses + [m for m in dv.signal_metrics(names, score) if m not in losses]  # a loss, or a proxy
via = _state.optional_metric_picker(c4, "Through (two-step)", through, losses, "via") if method == "two-step" else None
if method == "two-step" and via is None:
    st.warning("The two-step form needs a loss or a proxy (a held-out loss, a perplexity, p_correct, ...).")
    st.stop()
frame = _state.long_table(sel.runs, _state.setting_picker(sel.runs, [score, via]))
st.caption(fc.ASSUMPTIONS[method] + " Intervals: delta method with a t quantile (see README, Forecasts).")

measured = fc.score_series(frame, run, score, sel.x)
xs = [int(v) if float(v).is_integer() else float(v) for v in measured["x"]]
if len(xs) < 4:
    st.info(f"{run} has {len(xs)} checkpoints with {score}: a forecast needs at least 5 with x > 0.")
    st.stop()
label = X_LABELS.get(sel.x, sel.x)
d1, d2, d3 = st.columns(3)
fit_until = d1.selectbox(
    f"Fit up to {label}", xs, index=len(xs) - 1, key="fit_until", bind="query-params",
    help="Pick an earlier checkpoint to hide the rest of the run and see how the forecast would have done.",
)  # fmt: skip
horizon = d2.number_input("Horizon (× last checkpoint)", 1.0, 100.0, 2.0, 0.5, key="horizon", bind="query-params")
level = d3.slider("Interval level", 0.5, 0.99, 0.9, 0.01, key="level", bind="query-params")
at = sorted({x for x in xs if x > fit_until} | {xs[-1] * horizon})

try:
    rows, result = fc.forecast(
        frame, run, score, method=method, x=sel.x, fit_until=fit_until, at=at, via=via, level=level
    )
except ValueError as err:
    st.error(str(err))
    st.stop()
if not result.converged:
    st.warning("The fit did not converge: try another form, or fit on more checkpoints.")
elif not result.identifiable:
    st.warning("The data cannot pin down every parameter of this form: its intervals are not to be trusted.")

color = sel.colors.get(run)
st.plotly_chart(
    forecast_figure(measured, rows, result, x=sel.x, color=color or "#0072B2", style=sel.style),
    width="stretch", key="forecast",
)  # fmt: skip
last = rows.iloc[-1]
m1, m2, m3 = st.columns(3)
m1.metric(f"Forecast at {label} {last['x']:g}", f"{last['predicted']:.3f}", help=f"{level:.0%} prediction interval")
m2.metric(f"{level:.0%} interval", f"{last['lo']:.3f} to {last['hi']:.3f}")
hidden = rows[rows["measured"].notna()]
if len(hidden):
    covered = int(hidden["covered"].astype(bool).sum())
    m3.metric("Backtest: hidden checkpoints covered", f"{covered} of {len(hidden)}",
              help=f"median absolute error {np.median(hidden['abs_error']):.3f}")  # fmt: skip
st.dataframe(rows.round(4), hide_index=True, width="stretch")
