"""Evaluate: pick checkpoints x evaluations, queue the job, and start a worker to run it."""

from __future__ import annotations

import streamlit as st

from analysis.evals.tasks import bundled_task_names
from analysis.jobs import HELDOUT, PROXY, JobSpec, submit
from analysis.jobs.spec import DEFAULT_PROBES
from analysis.metrics.registry import metric_names
from pages import _state, _worker

sel = _state.selection()
st.title("Evaluate")
table = _state.runs_table()
if not len(table):
    _state.no_runs_message()
    st.stop()

names = list(table["name"])
run = st.selectbox("Run", names, index=names.index(sel.runs[0]) if sel.runs else 0, key="eval_run")
ckpts = _state.checkpoints(run)
steps = [int(s) for s in ckpts["step"]]
chosen = st.multiselect("Checkpoints (empty: all)", steps, key="eval_steps")
left, right = st.columns(2)
tasks = left.multiselect(
    "lm-eval tasks", bundled_task_names(), key="eval_tasks", accept_new_options=True,
    help="bundled tasks, any lm-eval task name, or the path of a task YAML",
)  # fmt: skip
metrics = right.multiselect(
    "Metrics", [HELDOUT, PROXY, *metric_names()], default=[HELDOUT], key="eval_metrics",
    help="held-out loss, token-level proxies, and internal metrics (flatness, pathways)",
)  # fmt: skip
with st.expander("Settings"):
    a, b, c = st.columns(3)
    data = a.text_input("Probe data (JSONL/txt file or folder)", str(DEFAULT_PROBES), key="eval_data")
    limit = b.number_input("Documents per task (0: all)", 0, 100_000, 200, key="eval_limit")
    device = c.selectbox("Device", ["auto", "cpu", "cuda", "mps"], key="eval_device")

buttons = st.columns([2, 2, 6])
run_now = buttons[0].button("Queue and run", type="primary", disabled=not (tasks or metrics), key="queue_run")
queue_only = buttons[1].button("Queue only", disabled=not (tasks or metrics), key="queue_only")
if run_now or queue_only:
    try:
        spec = JobSpec(
            run=run, steps=tuple(chosen) or None, tasks=tuple(tasks), metrics=tuple(metrics),
            data=data, limit=int(limit) or None, device=device,
        )  # fmt: skip
        job_id = submit(_state.store(), spec)
    except (ValueError, KeyError) as err:
        st.error(err.args[0] if isinstance(err, KeyError) else str(err))
    else:
        st.success(f"Queued job {job_id}: {len(chosen) or len(steps)} checkpoints.")
        if run_now:
            _worker.ensure_worker(_state.db_path())
        st.page_link("pages/jobs.py", label="Follow its progress on the Jobs page", icon=":material/pending:")
