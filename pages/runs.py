"""Runs: what is in the cache, each run's checkpoints, and its training curves."""

from __future__ import annotations

import streamlit as st

from analysis.charts import curves_figure
from analysis.runs.add import add_run
from analysis.store import StoreLockedError
from pages import _state

sel = _state.selection()
st.title("Runs")
table = _state.runs_table()
if added := st.session_state.pop("_added_run", None):
    st.success(added)

with st.expander("Add a run", expanded=not len(table)), st.form("add_run"):
    # The same checks as `python -m analysis add-run` (analysis.runs.add): nothing is written on bad input.
    path = st.text_input("Run folder or hf://org/model", key="add_path", placeholder="/data/runs/my-run")
    left, right = st.columns(2)
    name = left.text_input("Name (default: the folder or model name)", key="add_name")
    log = right.text_input("Training log (optional)", key="add_log", placeholder="trainer_state.json, .csv, .jsonl")
    pattern = left.text_input(
        "Revisions to keep (hf:// only)", key="add_filter", placeholder="step*000 or re:^step\\d+000$",
        help="A glob over the branch names, or a regular expression (re: prefix, or any of ^ $ ( ) + { } | \\).",
    )  # fmt: skip
    trust = right.checkbox("Trust its modelling code (runs Python from the checkpoints)", key="add_trust")
    if st.form_submit_button("Add run", type="primary"):
        failure = None
        with st.status("Adding the run…", expanded=True) as box:
            try:
                result = add_run(
                    _state.store(), path, name=name or None, log=log.strip() or None,
                    revision_filter=pattern.strip() or None, trust_remote_code=trust, progress=box.write,
                )  # fmt: skip
            except (ValueError, KeyError, OSError, StoreLockedError) as err:
                failure = err.args[0] if isinstance(err, KeyError) else str(err)
                box.update(label="Nothing added", state="error", expanded=False)
        if failure is not None:
            st.error(_state.md_text(failure))  # outside the box, which folds up: the reason stays in view
        else:
            _state.select_run_next(result.report.run)
            st.session_state["_added_run"] = "; ".join([result.summary(), *result.problems])
            st.rerun()  # the new run in the table and the sidebar, without a restart

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
