"""Status lines of queued and running jobs, read from a real cache's jobs table."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from analysis.activity import active_jobs, live, progress_key, status_line
from analysis.store import Store, UnitUpdate


def test_active_jobs_and_their_lines_from_the_store(populated_db: Path) -> None:
    store = Store(populated_db)
    done = store.create_job("alpha", {"metrics": ["heldout_loss"]}, [("1", 1)])
    store.set_job(done, "done")
    many = [f"metric_{i}" for i in range(20)]
    running = store.create_job("beta", {"tasks": ["arc_easy"], "metrics": many}, [("1", 4), ("10", 4)])
    store.set_job(running, "running", worker_pid=123)
    store.set_unit(UnitUpdate(running, "1", "done", 4, 4))
    store.set_unit(UnitUpdate(running, "10", "failed", 0, 4, "out of memory"))
    queued = store.create_job("alpha", {"metrics": ["fisher_trace"]}, [("1", 1)])
    active = active_jobs(store.jobs())
    assert active["id"].tolist() == [running, queued]  # oldest first; the finished job is not work under way
    first, second = (status_line(j) for j in active.itertuples())
    assert first.startswith("Job 2 running · run beta · arc_easy, metric_0, ")
    assert first.endswith(", … · 1/2 units · 1 failed") and len(first) < 120  # the list is shortened
    assert second == "Job 3 queued · run alpha · fisher_trace · 0/1 units"
    assert progress_key(active) == ((running, "running", 1), (queued, "queued", 0))


def test_a_running_job_without_a_live_worker_says_so_and_polls_nothing() -> None:
    job = pd.DataFrame(
        {"id": [4], "run": ["r"], "status": ["running"], "spec": [json.dumps({"metrics": ["m"]})], "units": [3],
         "units_done": [1], "units_failed": [0]}
    )  # fmt: skip
    row = next(job.itertuples())
    assert status_line(row, worker_alive=False).endswith("1/3 units · worker stopped: start one on the Jobs page")
    assert "worker stopped" not in status_line(row, worker_alive=True)
    assert not live(job, {4: False}) and live(job, {4: True}) and live(job, {})
    queued = job.assign(status="queued")
    assert live(queued, {4: False})  # a queued job starts as soon as a worker does


def test_nothing_active_and_odd_specs() -> None:
    assert active_jobs(pd.DataFrame()).empty and progress_key(active_jobs(pd.DataFrame())) == ()
    row = next(
        pd.DataFrame(
            {"id": [1], "run": ["r"], "status": ["queued"], "spec": ["{not json"], "units": [2], "units_done": [0]}
        ).itertuples()
    )
    assert status_line(row) == "Job 1 queued · run r · 0/2 units"  # a spec it cannot read is left out, not an error
