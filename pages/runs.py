"""Runs: what is in the cache, each run's checkpoints, and its training curves."""

from __future__ import annotations

import streamlit as st

from analysis.charts import curves_figure
from pages import _state

sel = _state.selection()
st.title("Runs")
table = _state.runs_table()
if not len(table):
    _state.no_runs_message()
    st.stop()

st.dataframe(
    table[["name", "checkpoints", "first_step", "last_step", "log_metrics", "results", "trust_remote_code", "source"]],
    hide_index=True,
    width="stretch",
)
trusted = sorted(table.loc[table["trust_remote_code"], "name"])
if trusted:
    # Names go in as data (st.text), never as markdown: a run name is whatever its folder was called.
    st.warning("These runs execute their checkpoints' own Python code when loaded (added with --trust-remote-code):")
    st.text(", ".join(trusted))
if not sel.runs:
    st.info("Pick one or more runs in the sidebar to see their curves.")
    st.stop()

log = _state.log_series(sel.runs)
metrics = sorted(log["metric"].unique()) if len(log) else []
if not metrics:
    st.warning("The selected runs have no training log. Pass one with `add-run PATH --log FILE`.")
else:
    default = "train/loss" if "train/loss" in metrics else metrics[0]
    left, mid, right = st.columns([3, 2, 2])
    metric = left.selectbox("Metric", metrics, index=metrics.index(default), key="metric", bind="query-params")
    smoothing = mid.slider("Smoothing (EMA)", 0.0, 0.99, 0.0, 0.01, key="smooth", bind="query-params")
    log_x = right.toggle("Log x", value=True, key="logx", bind="query-params")
    log_y = right.toggle("Log y", value=False, key="logy", bind="query-params")
    fig = curves_figure(
        log, metric, x=sel.x, smoothing=smoothing, log_x=log_x, log_y=log_y, colors=sel.colors, style=sel.style
    )
    st.plotly_chart(fig, width="stretch", key="curve")

st.subheader("Checkpoints")
for run in sel.runs:
    ckpts = _state.checkpoints(run)
    with st.expander(f"{_state.md_text(run)}: {len(ckpts)} checkpoints", expanded=len(sel.runs) == 1):
        st.dataframe(ckpts, hide_index=True, width="stretch")
