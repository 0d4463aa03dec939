"""Compare runs: downstream ability at the same loss, so runs that reach a loss differently can be compared."""

from __future__ import annotations

import streamlit as st

from analysis import divergence as dv
from analysis.charts import matched_loss_figure, metric_vs_figure, residual_figure
from pages import _state

sel = _state.selection()
st.title("Compare runs")
if len(sel.runs) < 2:
    st.info("Pick at least two runs in the sidebar to compare them at matched loss.")
    st.stop()

frame = _state.long_table(sel.runs)
names = _state.metric_names(frame)
losses, scores = dv.loss_metrics(names), dv.downstream_metrics(names)
if not losses or not scores:
    st.warning("These runs need a loss and a downstream score; evaluate their checkpoints first.")
    st.page_link("pages/evaluate.py", label="Open the Evaluate page", icon=":material/play_arrow:")
    st.stop()

c1, c2, c3, c4 = st.columns([3, 3, 2, 2])
loss = _state.metric_picker(c1, "Loss", losses, losses, "loss")
score = _state.metric_picker(c2, "Downstream", scores, _state.accuracy_first(scores), "score")
reference = c3.selectbox("Reference run", list(sel.runs), key="ref", bind="query-params")
levels = c4.slider("Loss levels", 3, 20, 8, key="levels", bind="query-params")
runs = [reference, *[r for r in sel.runs if r != reference]]
frame = _state.long_table(sel.runs, _state.setting_picker(sel.runs, [loss, score]))

try:
    matched = dv.matched_loss(frame, loss, score, runs, levels=levels, x=sel.x)
except ValueError as err:
    st.error(str(err))
    st.stop()
if not len(matched):
    st.warning("The runs' loss ranges do not overlap, so there is no common loss to compare at.")
    st.stop()

st.plotly_chart(matched_loss_figure(matched, colors=sel.colors, style=sel.style), width="stretch", key="matched")
gaps = matched[matched["run"] != reference]
if len(gaps):
    best = gaps.loc[gaps["gap"].abs().idxmax()]
    st.metric(
        f"Largest gap to {reference} at the same {loss}",
        f"{best['gap']:+.3f} ± {best['gap_stderr']:.3f}",
        help=f"{best['run']} at {loss} = {best['loss_level']:.4g} {dv.better_sign(matched, 'the reference')}",
    )
st.dataframe(matched.round(4), hide_index=True, width="stretch")
st.plotly_chart(metric_vs_figure(frame, loss, score, x=sel.x, colors=sel.colors, style=sel.style), width="stretch")

st.subheader("Better or worse than its loss predicts")
residual = dv.residuals(frame, loss, score, x=sel.x)
if len(residual):
    fig = residual_figure(residual, x=sel.x, colors=sel.colors, style=sel.style)
    st.plotly_chart(fig, width="stretch", key="residual")
    last = dv.last_residuals(residual)
    cols = st.columns(min(len(last), 4))
    for i, (run, value) in enumerate(last.items()):
        cols[i % len(cols)].metric(
            f"{_state.md_text(run)}, last checkpoint", f"{value:+.3f}", help="score minus the pooled line"
        )
    st.caption(
        f"One straight line of {_state.md_text(score)} on {_state.md_text(loss)}, fitted to every checkpoint of "
        "every run; a run above zero does more downstream with the same loss. A line describes only runs "
        "whose score and loss move together: check the scatter above."
    )
else:
    st.caption("Too few checkpoints with both a loss and a score to fit a line.")
