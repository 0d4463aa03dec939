"""Divergence: loss and a downstream score on one x-axis, the windows where they part ways, and why."""

from __future__ import annotations

import streamlit as st

from analysis import divergence as dv
from analysis import schedule
from analysis.charts import X_LABELS, loss_downstream_figure, ranking_heatmap, trajectory_figure
from pages import _state

FLAT_OF = {"range": "its range", "value": "its value"}  # short: the column is narrow

sel = _state.selection()
st.title("Divergence")
_state.require_runs(sel)

frame = _state.long_table(sel.runs)
names = _state.metric_names(frame)
losses, scores = dv.loss_metrics(names), dv.downstream_metrics(names)
if not losses or not scores:
    missing = "loss (training log or heldout_loss)" if not losses else "downstream score"
    st.warning(f"The selected runs have no {missing} yet: evaluate some checkpoints first.")
    st.code(f"python -m analysis eval --run {sel.runs[0]} --tasks modarith_em,modarith_mc --metrics heldout_loss")
    st.page_link("pages/evaluate.py", label="Open the Evaluate page", icon=":material/play_arrow:")
    st.stop()

c1, c2, c3, c4, c5 = st.columns([3, 3, 2, 2, 2])
loss = _state.metric_picker(c1, "Loss", losses, losses, "loss")
score = _state.metric_picker(c2, "Downstream", scores, _state.accuracy_first(scores), "score")
smoothing = c3.slider("Smoothing", 0.0, 0.99, 0.0, 0.01, key="smooth", bind="query-params")
tol = c4.number_input("Flat loss within", 0.0, 1.0, 0.02, 0.01, key="tol", bind="query-params")
tol_of = c4.selectbox(
    "of", list(FLAT_OF), format_func=FLAT_OF.__getitem__, key="flat_of", bind="query-params",
    help="Flat means the loss moves less than this share of its whole range over the run (what looks flat on "
    "the chart, also for a training loss that fits to near zero), or of its own value where a span starts.",
)  # fmt: skip
alpha = c5.number_input(
    "False-alarm rate (α)", 0.001, 0.5, 0.05, 0.01, key="alpha", bind="query-params", format="%.3f",
    help="The chance that a run with no real move gets any window at all, whatever its number of checkpoints.",
)  # fmt: skip
log_x = c3.toggle("Log x", value=True, key="logx", bind="query-params")
chosen = _state.setting_picker(sel.runs, [loss, score])  # one setting per metric: never an average of several
frame = _state.long_table(sel.runs, chosen)

windows, aligned = _state.divergence(sel.runs, loss, score, tol, alpha, sel.x, chosen, tol_of)
phases = schedule.run_phases(frame, x=sel.x)  # warmup / decay of each run that logs its learning rate

fig = loss_downstream_figure(
    frame, loss, score, x=sel.x, smoothing=smoothing, log_x=log_x, colors=sel.colors, style=sel.style,
    windows=windows, phases=phases,
)  # fmt: skip
st.plotly_chart(fig, width="stretch", key="divergence")

left, right = st.columns(2)
with left:
    st.subheader("Windows")
    st.caption(dv.windows_caption(windows, _state.md_text(score), tol, alpha, tol_of))
    if len(windows):
        label = X_LABELS.get(sel.x, sel.x)
        st.markdown("\n".join(f"- {_state.md_text(t)}" for t in dv.window_sentences(windows, score, label)))
        notes = schedule.decay_notes(windows, phases)
        if any(notes):
            st.warning(schedule.decay_sentence(notes))
        st.dataframe(windows.assign(lr_schedule=notes).round(4), hide_index=True, width="stretch")
    st.subheader("Loss vs downstream correlation")
    # Over a chosen span of checkpoints (e.g. only after the loss flattened); the span is in the URL.
    xs = sorted({int(v) if float(v).is_integer() else float(v) for v in aligned["x"].dropna()})
    span = None
    if len(xs) >= 2:
        w1, w2 = st.columns(2)
        label = X_LABELS.get(sel.x, sel.x)
        lo = w1.selectbox(f"From {label}", xs, index=0, key="corr_from", bind="query-params")
        hi = w2.selectbox(f"To {label}", xs, index=len(xs) - 1, key="corr_to", bind="query-params")
        span = (min(lo, hi), max(lo, hi))
    corr = _state.correlations(sel.runs, loss, score, sel.x, span, chosen)
    if len(corr):
        st.caption(dv.CORRELATION_NOTE)
        st.dataframe(corr.round(3), hide_index=True, width="stretch")
    else:
        st.caption("Fewer than 3 checkpoints of any run in this span: widen it to correlate.")
with right:
    st.plotly_chart(trajectory_figure(aligned, colors=sel.colors, style=sel.style), width="stretch", key="trajectory")

st.subheader("Which signal predicts the downstream score?")
ranking = _state.predictor_ranking(sel.runs, score, loss, sel.x, chosen)
if len(ranking):
    st.markdown(_state.md_text(dv.ranking_verdict(ranking, loss)))
    st.plotly_chart(ranking_heatmap(ranking, style=sel.style), width="stretch", key="ranking")
    st.dataframe(ranking.round(3), hide_index=True, width="stretch")
else:
    st.caption("Too few checkpoints with both a signal and a downstream score to rank anything.")
