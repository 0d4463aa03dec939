"""Starting the job worker from the dashboard: one background process per cache file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import streamlit as st

from analysis.jobs.runner import process_alive


@st.cache_resource(max_entries=8)
def _workers() -> dict[str, subprocess.Popen]:
    return {}


def worker_running(db: Path) -> bool:
    proc = _workers().get(str(db))
    return proc is not None and proc.poll() is None and process_alive(proc.pid)


def ensure_worker(db: Path) -> bool:
    """Start ``python -m analysis worker --once`` for ``db`` unless one started here still runs."""
    if worker_running(db):
        return False
    log = open(Path(db).with_suffix(".worker.log"), "a")  # noqa: SIM115 - the child owns it
    _workers()[str(db)] = subprocess.Popen(
        [sys.executable, "-m", "analysis", "worker", "--once", "--poll", "1", "--db", str(db)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        cwd=Path(__file__).resolve().parent.parent,
        env={**os.environ},
    )
    return True
