"""Work under way, as the pages show it: one status line per queued or running job.

Input is the store's jobs table (``Store.jobs``: id, run, status, spec, worker_pid, units, units_done,
units_failed, items_done, items_total). The pages redraw themselves while something can still change
(:func:`live`), and only then: an idle dashboard polls nothing.
"""

from __future__ import annotations

import json

import pandas as pd

ACTIVE = ("queued", "running")


def active_jobs(jobs: pd.DataFrame) -> pd.DataFrame:
    """The queued and running jobs, oldest first (the order a worker takes them in)."""
    if not len(jobs) or "status" not in jobs:
        return jobs.iloc[0:0] if isinstance(jobs, pd.DataFrame) else pd.DataFrame()
    return jobs[jobs["status"].isin(ACTIVE)].sort_values("id", ignore_index=True)


def _what(spec: object, limit: int = 60) -> str:
    """The tasks and metrics a job computes, shortened to ``limit`` characters."""
    try:
        parsed = json.loads(spec) if isinstance(spec, str) else spec
    except json.JSONDecodeError:
        return ""
    if not isinstance(parsed, dict):
        return ""
    names = [str(n) for key in ("tasks", "metrics") for n in (parsed.get(key) or [])]
    text = ", ".join(names)
    return text if len(text) <= limit else text[: limit - 1].rsplit(",", 1)[0] + ", …"


def status_line(job, worker_alive: bool | None = None) -> str:
    """One line for a job row: "Job 3 running · run grokking · heldout_loss, … · 5/21 units".

    ``worker_alive`` False on a running job adds that its worker stopped (it resumes when one starts).
    """
    what = _what(getattr(job, "spec", None))
    parts = [f"Job {int(job.id)} {job.status}", f"run {job.run}", *([what] if what else [])]
    parts.append(f"{int(job.units_done)}/{int(job.units)} units")
    if int(getattr(job, "units_failed", 0) or 0):
        parts.append(f"{int(job.units_failed)} failed")
    if job.status == "running" and worker_alive is False:
        parts.append("worker stopped: start one on the Jobs page")
    return " · ".join(parts)


def progress_key(active: pd.DataFrame) -> tuple[tuple[int, str, int], ...]:
    """What changes when a checkpoint lands or a job starts or ends: (id, status, units done) per active job.

    Item progress inside a checkpoint is left out on purpose: it moves the status line, not the charts.
    """
    return tuple((int(j.id), str(j.status), int(j.units_done)) for j in active.itertuples())


def live(active: pd.DataFrame, alive: dict[int, bool]) -> bool:
    """Whether anything can still change: a queued job, or a running one whose worker is alive.

    ``alive``: job id -> whether its worker process runs (a job without an entry counts as alive).
    A running job whose worker died stays as it is until a worker starts again, so it polls nothing.
    """
    return any(j.status == "queued" or alive.get(int(j.id), True) for j in active.itertuples())
