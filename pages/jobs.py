"""Jobs: the queue, progress per job and per checkpoint, failures with their reasons, cancel."""

from __future__ import annotations

import json

import streamlit as st

from analysis.logs import job_log
from pages import _state, _worker

_state.selection()  # the page setup and sidebar when a link opens this page directly
st.title("Jobs")
db = _state.db_path()
top = st.columns([2, 2, 6])
if top[0].button("Start worker", disabled=_worker.worker_running(db)):
    _worker.ensure_worker(db)
top[1].caption("worker: running" if _worker.worker_running(db) else "worker: not started from here")


@st.fragment(run_every=2.0)
def queue() -> None:
    jobs = _state.jobs()
    if not len(jobs):
        st.info("No jobs yet. Queue one on the Evaluate page, or run `python -m analysis eval --run NAME ...`.")
        return
    for job in jobs.itertuples():
        spec = json.loads(job.spec)
        what = ", ".join([*spec.get("tasks", []), *spec.get("metrics", [])])
        done = job.items_done / job.items_total if job.items_total else 0.0
        with st.container(border=True):
            head = st.columns([6, 2, 2])
            head[0].markdown(f"**Job {job.id}** · run {_state.md_text(job.run)} · {_state.md_text(what)}")
            head[1].markdown(f"`{job.status}`")
            if job.status in ("queued", "running") and head[2].button("Cancel", key=f"cancel-{job.id}"):
                _state.store().set_job(int(job.id), "cancelled", "cancelled from the dashboard")
            st.progress(
                min(done, 1.0),
                text=f"{job.units_done}/{job.units} checkpoints · {job.items_done}/{job.items_total} items",
            )
            if job.status == "running":  # what each running checkpoint is at, e.g. "hessian_trace probe 12/32"
                units = _state.job_units(int(job.id))
                for unit in units[(units["status"] == "running") & (units["message"] != "")].itertuples():
                    st.caption(f"step {_state.md_text(unit.unit)}: {_state.md_text(unit.message)}")
            if job.units_failed:
                units = _state.job_units(int(job.id))
                st.error(f"{job.units_failed} checkpoint(s) failed")
                st.dataframe(units[units["status"] == "failed"][["unit", "message"]], hide_index=True)
            if job.message:
                st.caption(_state.md_text(job.message))
            if st.toggle("Log", key=f"log-{job.id}", help="the last lines the worker logged about this job"):
                units = _state.job_units(int(job.id))
                where, lines = job_log(db, int(job.id), units, job.message)
                st.caption(f"from {_state.md_text(where)}")
                st.code("\n".join(lines) or "(nothing logged yet)", language=None)


queue()
