"""Run a job's checkpoint units as Ray tasks; this process stays the cache's single writer.

Each unit that still lacks something becomes one remote ``compute_unit`` call (pure: it
writes nothing). Results come back as they finish (``ray.wait``) and the driver writes each
unit's rows together with its status in one transaction, exactly as ``run_job`` does, so
the statuses, the resume behaviour and the stored values are the same as the local
executor's. Ray is imported only here: the rest of the project runs without it.
"""

from __future__ import annotations

import os
from pathlib import Path

from analysis.jobs.runner import (
    JobReport,
    Progress,
    _cancelled,
    _fail,
    _first_line,
    compute_unit,
    finish_job,
    load_job,
    prepare_unit,
    record_unit,
)
from analysis.store import Store, UnitUpdate

PACKAGE = Path(__file__).resolve().parent.parent  # analysis/, shipped to a remote cluster's workers


def _init(address: str | None) -> bool:
    """Connect to (or start) Ray; returns whether this call started it (and so must shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    try:
        if address:
            ray.init(address=address, runtime_env={"py_modules": [str(PACKAGE)]}, log_to_driver=False)
        else:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as err:
        where = address or "a local instance"
        raise ValueError(
            f"cannot start Ray on {where} ({_first_line(err)}); check --ray-address / RAY_ADDRESS"
        ) from None
    return True


def run_job_ray(
    store: Store,
    job_id: int,
    address: str | None = None,
    num_gpus_per_unit: float = 0,
    *,
    progress: Progress | None = None,
) -> JobReport:
    """Run (or resume) a queued job with one Ray task per checkpoint unit; returns a JobReport."""
    import ray

    plan = load_job(store, job_id)
    items = plan.items
    report = JobReport(job_id, failed=[])
    n_units = len(plan.units)
    started = _init(address)
    remote = ray.remote(num_gpus=num_gpus_per_unit, max_retries=0)(compute_unit)
    store.set_job(job_id, "running", worker_pid=os.getpid())
    pending: dict = {}  # ObjectRef -> (unit name, step, items to compute)
    finished = 0
    try:
        for unit in plan.units.itertuples():
            prepared = prepare_unit(store, job_id, plan, unit, report)
            if prepared is None or not prepared[3]:
                finished += 1
                continue
            step, path, fp, todo = prepared
            ref = remote.remote(
                plan.spec, todo, path, fp, step, plan.trust_remote_code, plan.versions, done=len(items) - len(todo)
            )
            pending[ref] = (unit.unit, step, todo)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=2.0)
            if not ready:
                if _cancelled(store, job_id):
                    report.cancelled = True
                    break
                continue
            ref = ready[0]
            name, step, todo = pending.pop(ref)
            try:
                out = ray.get(ref)
            except ray.exceptions.RayError as err:  # the worker died, or the task could not run at all
                _fail(store, job_id, name, len(items), f"Ray task failed: {_first_line(err)}", report)
            else:
                record_unit(store, job_id, name, step, len(items), len(todo), out, report, where=" (ray)")
            finished += 1
            if progress:
                progress(finished, n_units, name, len(items), len(items), "done")
    finally:
        for ref, (name, _, _) in pending.items():  # cancelled or interrupted: the next run redoes these
            ray.cancel(ref, force=True)
            store.set_unit(UnitUpdate(job_id, name, "queued", 0, len(items), "interrupted"))
        if started:
            ray.shutdown()
    return finish_job(store, job_id, report)
