"""The status line of work under way above every page, and the page reruns it triggers as results land."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from analysis import activity
from analysis.store import Store
from pages._cache import _store, db_path, generation, guarded
from pages._markdown import md_text

REFRESH_SECONDS = 2.0
_PROGRESS_SEEN = "_progress_seen"


@st.cache_data(max_entries=8, show_spinner=False)
def _open_jobs(db: str, gen: int) -> pd.DataFrame:
    return activity.active_jobs(Store(db, lock_timeout=10.0).jobs())


def _active_now(fresh: bool = False) -> tuple[pd.DataFrame, dict[int, bool]]:
    """Queued and running jobs, and whether each running one's worker process is alive.

    ``fresh``: read the write generation now rather than the page run's (a fragment tick between runs).
    """
    db = str(db_path())
    gen = guarded(lambda: _store().generation()) if fresh else generation()
    active = guarded(lambda: _open_jobs(db, gen))
    running = active[active["status"] == "running"] if len(active) else active
    if not len(running):
        return active, {}
    from analysis.jobs.runner import process_alive  # imports torch: only once a job runs

    return active, {int(j.id): process_alive(j.worker_pid) for j in running.itertuples()}


def work_under_way() -> None:
    """Above every page (``selection`` calls it): a status line per queued or running job, linked to the Jobs page.

    While something can still change, the line redraws every few seconds and the whole page reruns when a
    checkpoint lands or a job starts or ends, so its charts show the new results. With no job queued or
    running nothing is drawn and nothing polls.
    """
    active, alive = _active_now()
    st.session_state[_PROGRESS_SEEN] = activity.progress_key(active)
    if not len(active):
        return
    if activity.live(active, alive):
        _live_status()
    else:
        _status(active, alive)


@st.fragment(run_every=REFRESH_SECONDS)
def _live_status() -> None:
    active, alive = _active_now(fresh=True)
    if activity.progress_key(active) != st.session_state.get(_PROGRESS_SEEN):
        st.rerun(scope="app")  # a checkpoint landed, or a job started or ended: redraw the page's charts
    _status(active, alive)


def _status(active: pd.DataFrame, alive: dict[int, bool]) -> None:
    text, link = st.columns([9, 1], vertical_alignment="center")
    for job in active.itertuples():
        text.caption(":material/pending: " + md_text(activity.status_line(job, alive.get(int(job.id)))))
    link.page_link("pages/jobs.py", label="Jobs", icon=":material/pending:")
