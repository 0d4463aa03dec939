"""The worker's job lookups: one-row queries against reading the whole queue and filtering it in pandas.

A worker asks whether its job was cancelled before every unit (and every 2 s under Ray), and which
job to take next whenever it is idle. Both sides ask the same questions of the same cache, in this
process; the baseline is what the runner did before ``Store.job_status`` / ``Store.open_jobs``.

    python -m bench.job_queries [--jobs 500] [--repeats 20]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from analysis.jobs.runner import next_job, process_alive
from analysis.store import Store
from bench.common import median_time, report


def _queue(path: Path, n_jobs: int) -> tuple[Store, int]:
    """A cache whose queue holds ``n_jobs`` finished jobs of 8 units each, then one queued job."""
    store = Store(path)
    units = [(str(step), 4) for step in range(0, 80, 10)]
    for _ in range(n_jobs):
        store.set_job(store.create_job("bench", {"run": "bench"}, units), "done")
    return store, store.create_job("bench", {"run": "bench"}, units)


def _cancelled_before(store: Store, job_id: int) -> bool:
    jobs = store.jobs(limit=1_000_000)
    return bool((jobs.loc[jobs["id"] == job_id, "status"] == "cancelled").any())


def _next_job_before(store: Store) -> int | None:
    jobs = store.jobs(limit=1_000_000)
    for rec in jobs.sort_values("id").itertuples():
        if rec.status == "queued" or (rec.status == "running" and not process_alive(rec.worker_pid)):
            return int(rec.id)
    return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        store, queued = _queue(Path(tmp) / "cache.duckdb", args.jobs)
        assert next_job(store) == _next_job_before(store) == queued, "both sides must pick the same job"
        assert store.job_status(queued) == "queued" and not _cancelled_before(store, queued)
        what = f"{args.jobs + 1} jobs of 8 units in the queue; median of {args.repeats}"
        ours = median_time(lambda: store.job_status(queued) == "cancelled", args.repeats)
        base = median_time(lambda: _cancelled_before(store, queued), args.repeats)
        report("job_queries: cancelled?", ours, base, what)
        ours = median_time(lambda: next_job(store), args.repeats)
        base = median_time(lambda: _next_job_before(store), args.repeats)
        report("job_queries: next job", ours, base, what)


if __name__ == "__main__":
    main()
