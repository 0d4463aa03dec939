"""The job queue: jobs and their units, progress updates, and the queries the worker polls.

A job is one queued request (its JobSpec as JSON) split into units (typically one checkpoint each);
a unit's progress is written in its own short transaction, or with the unit's results (results.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import duckdb
import pandas as pd

from analysis.store.connection import StoreConnection, fetch_row


@dataclass(frozen=True)
class UnitUpdate:
    """A job unit's progress: ``done`` of ``total`` items, and its status."""

    job_id: int
    unit: str
    status: str  # queued | running | done | failed | cancelled
    done: int = 0
    total: int = 0
    message: str = ""


JOB_STATES = ("queued", "running", "done", "failed", "cancelled")


@dataclass(frozen=True)
class JobRecord:
    """One queued, running or finished job as the worker reads it."""

    id: int
    run: str
    status: str
    spec: dict  # the JobSpec's fields, as queued
    message: str = ""
    worker_pid: int | None = None  # the worker that runs (or ran) it


def _one_line(text: str, limit: int = 500) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def update_unit(con: duckdb.DuckDBPyConnection, u: UnitUpdate) -> None:
    """Record a unit's progress inside the caller's open transaction."""
    if u.status not in JOB_STATES:
        raise ValueError(f"unit status {u.status!r}: use one of {', '.join(JOB_STATES)}")
    con.execute(
        """UPDATE job_units SET status = ?, done = ?, total = ?, message = ?, updated_at = now()
           WHERE job_id = ? AND unit = ?""",
        [u.status, u.done, u.total, _one_line(u.message), u.job_id, u.unit],
    )


class JobsMixin(StoreConnection):
    """The job queue's part of Store: queueing jobs, recording progress, reading the queue."""

    def create_job(self, run: str, spec: dict, units: list[tuple[str, int]]) -> int:
        """Queue a job with its units (name, number of items); returns the job id."""
        with self._write() as con:
            (job_id,) = fetch_row(con, "SELECT coalesce(max(id), 0) + 1 FROM jobs")
            con.execute(
                "INSERT INTO jobs (id, run, spec) VALUES (?, ?, ?)",
                [job_id, run, json.dumps(spec, sort_keys=True, default=str)],
            )
            for name, total in units:
                con.execute("INSERT INTO job_units (job_id, unit, total) VALUES (?, ?, ?)", [job_id, name, total])
        return int(job_id)

    def set_job(self, job_id: int, status: str, message: str = "", *, worker_pid: int | None = None) -> None:
        """Set a job's status; a cancelled job stays cancelled."""
        if status not in JOB_STATES:
            raise ValueError(f"job status {status!r}: use one of {', '.join(JOB_STATES)}")
        with self._write() as con:
            con.execute(
                """UPDATE jobs SET status = ?, message = ?, worker_pid = ?, updated_at = now()
                   WHERE id = ? AND (status != 'cancelled' OR ? = 'cancelled')""",
                [status, _one_line(message), worker_pid, job_id, status],
            )

    def set_unit(self, update: UnitUpdate) -> None:
        """Record a unit's progress in its own short transaction."""
        with self._write() as con:
            update_unit(con, update)

    def jobs(self, limit: int = 50) -> pd.DataFrame:
        """Recent jobs with their unit counts, newest first."""
        return self._read(
            """SELECT j.id, j.run, j.status, j.message, j.spec, j.worker_pid, j.created_at, j.updated_at,
                      count(u.unit) AS units,
                      count(u.unit) FILTER (WHERE u.status = 'done') AS units_done,
                      count(u.unit) FILTER (WHERE u.status = 'failed') AS units_failed,
                      coalesce(sum(u.done), 0) AS items_done, coalesce(sum(u.total), 0) AS items_total
               FROM jobs j LEFT JOIN job_units u ON u.job_id = j.id
               GROUP BY ALL ORDER BY j.id DESC LIMIT ?""",
            [limit],
        )

    def job_units(self, job_id: int) -> pd.DataFrame:
        """A job's units in order."""
        return self._read(
            """SELECT unit, status, done, total, message, updated_at FROM job_units
               WHERE job_id = ? ORDER BY TRY_CAST(unit AS BIGINT), unit""",
            [job_id],
        )

    # -- targeted job queries (the worker polls these: one indexed row, not the whole queue) ----------

    def job(self, job_id: int) -> JobRecord | None:
        """Job ``job_id``, or None when the cache has no such job."""
        frame = self._read("SELECT id, run, status, spec, message, worker_pid FROM jobs WHERE id = ?", [job_id])
        return self._job_record(frame.iloc[0]) if len(frame) else None

    def job_status(self, job_id: int) -> str | None:
        """The status of job ``job_id`` (one of JOB_STATES), or None when there is no such job."""
        frame = self._read("SELECT status FROM jobs WHERE id = ?", [job_id])
        return str(frame["status"].iloc[0]) if len(frame) else None

    def open_jobs(self) -> list[JobRecord]:
        """Queued and running jobs, oldest first: the ones a worker may have to take up."""
        frame = self._read(
            """SELECT id, run, status, spec, message, worker_pid FROM jobs
               WHERE status IN ('queued', 'running') ORDER BY id"""
        )
        return [self._job_record(rec) for _, rec in frame.iterrows()]

    @staticmethod
    def _job_record(rec: pd.Series) -> JobRecord:
        pid = rec["worker_pid"]
        return JobRecord(
            int(rec["id"]), rec["run"], rec["status"], json.loads(rec["spec"]), rec["message"],
            None if pd.isna(pid) else int(pid),
        )  # fmt: skip
