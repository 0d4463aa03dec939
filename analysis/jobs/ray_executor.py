"""Run a job on Ray: each checkpoint's metric groups as Ray tasks; this process stays the cache's single writer.

Each unit (checkpoint) that still lacks something is split into metric groups
(``metric_groups``, as each item's work kind says): the evaluations that share forward passes over the probe data, the
routing metrics that share one routing profile, and each other internal metric (Hessian
trace, top eigenvalue, ...) on its own. Every group is one remote ``compute_unit`` call
(pure: it writes nothing), so the expensive metrics of one checkpoint run on different
workers at once. ``split="checkpoint"`` sends a whole unit as one task instead (one
checkpoint load per unit). Results come back as they finish (``ray.wait``); once every
group of a unit is back, the driver writes the unit's rows together with its status in
one transaction, exactly as ``run_job`` does, so statuses, resume behaviour and stored
values are the local executor's. Ray is imported only here.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from analysis.jobs.kinds import get_kind
from analysis.jobs.runner import (
    JobReport,
    Progress,
    UnitOutput,
    _cancelled,
    _first_line,
    compute_unit,
    finish_job,
    load_job,
    prepare_unit,
    record_unit,
)
from analysis.jobs.spec import Item
from analysis.store import Store, UnitUpdate

PACKAGE = Path(__file__).resolve().parent.parent  # analysis/, shipped to a remote cluster's workers

log = logging.getLogger(__name__)


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
    log.info("Ray: %s", f"connected to {address}" if address else "started a local instance")
    return True


SPLITS = ("auto", "group", "checkpoint")


def metric_groups(todo: list[Item]) -> list[list[Item]]:
    """``todo`` in the groups Ray may compute apart, each at the cost of one checkpoint load.

    Each item's work kind names its group (``WorkKind.group``): lm-eval tasks, proxies, held-out
    loss and memorisation rows (forward passes over the data) form one group; the routing metrics,
    which share one routing profile, another; every other internal metric and every fine-tune is a
    group of its own. Order follows ``todo``.
    """
    groups: dict[str, list[Item]] = {}
    for item in todo:
        groups.setdefault(get_kind(item.kind).group(item), []).append(item)
    return list(groups.values())


def worker_slots(num_gpus_per_unit: float = 0) -> int:
    """How many tasks the connected Ray cluster runs at once: its GPUs over the GPUs per task, else its CPUs."""
    import ray

    resources = ray.cluster_resources()
    if num_gpus_per_unit > 0:
        return int(resources.get("GPU", 0) // num_gpus_per_unit)
    return int(resources.get("CPU", 1))


@dataclass
class _Unit:
    """A unit whose groups are out on Ray: what came back so far."""

    name: str
    step: int
    todo: int  # items to compute
    groups: int  # groups sent out
    waiting: int = field(init=False)  # groups not back yet
    out: UnitOutput = field(default_factory=UnitOutput)
    errors: list[str] = field(default_factory=list)  # groups that failed as a whole

    def __post_init__(self) -> None:
        self.waiting = self.groups

    def add(self, items: list[Item], got: UnitOutput | None, error: str | None) -> None:
        self.waiting -= 1
        if error is None and got is not None and got.error is not None:
            error = got.error
        if error is not None or got is None:
            error = error or "the Ray task returned no output"
            self.errors.append(error)
            self.out.problems += [f"{item.label}: {error}" for item in items]
            self.out.incomplete = True
            return
        self.out.rows += got.rows
        self.out.samples += got.samples
        self.out.problems += got.problems
        self.out.seconds = max(self.out.seconds, got.seconds)

    def merged(self) -> UnitOutput:
        """The unit's output; a unit whose every group failed as a whole failed as a whole."""
        if len(self.errors) == self.groups:
            return UnitOutput(error=self.errors[0])
        return self.out


def run_job_ray(
    store: Store,
    job_id: int,
    address: str | None = None,
    num_gpus_per_unit: float = 0,
    *,
    split: str = "auto",
    progress: Progress | None = None,
) -> JobReport:
    """Run (or resume) a queued job with one Ray task per metric group or per checkpoint; returns a JobReport.

    ``split="auto"`` splits by metric group when fewer checkpoints need computing than the cluster
    has slots for (``worker_slots``), and sends whole checkpoints otherwise: each group loads its
    checkpoint again, which only pays when workers would sit idle.
    """
    import ray

    if split not in SPLITS:
        raise ValueError(f"split {split!r}: use one of {', '.join(SPLITS)}")
    plan = load_job(store, job_id)
    n_items = len(plan.items)
    report = JobReport(job_id, failed=[])
    n_units = len(plan.units)
    started = _init(address)
    remote = ray.remote(num_gpus=num_gpus_per_unit, max_retries=0)(compute_unit)
    pending: dict = {}  # ObjectRef -> (unit, the group's items)
    units: dict[str, _Unit] = {}  # units with groups still out, by name
    finished = 0
    try:
        slots = worker_slots(num_gpus_per_unit)
        if slots < 1:  # the tasks would wait for a GPU forever; the job stays queued
            raise ValueError(
                f"the Ray cluster has {ray.cluster_resources().get('GPU', 0):g} GPUs, too few for "
                f"{num_gpus_per_unit:g} per task; lower --ray-gpus-per-unit or add GPU workers"
            )
        store.set_job(job_id, "running", worker_pid=os.getpid())
        work = []
        for unit in plan.units.itertuples():
            prepared = prepare_unit(store, job_id, plan, unit, report)
            if prepared is None or not prepared[3]:
                finished += 1
                continue
            work.append((unit, *prepared))
        if split == "auto":
            split = "group" if len(work) < slots else "checkpoint"
        log.info("job %d: %d checkpoint(s) to compute on %d Ray slot(s), one task per %s", job_id, len(work), slots,
                 "metric group" if split == "group" else "checkpoint")  # fmt: skip
        for unit, step, path, fp, todo in work:
            groups = metric_groups(todo) if split == "group" else [todo]
            state = _Unit(unit.unit, step, len(todo), len(groups))
            units[unit.unit] = state
            log.info("job %d step %s: sent to Ray as %d task(s)", job_id, unit.unit, len(groups))
            for group in groups:
                # The group's kinds travel with it: a worker adopts any this process registered and it lacks.
                kinds = [get_kind(k) for k in dict.fromkeys(item.kind for item in group)]
                ref = remote.remote(
                    plan.spec, group, path, fp, step, plan.trust_remote_code, plan.versions,
                    done=n_items - len(todo), kinds=kinds,
                )  # fmt: skip
                pending[ref] = (state, group)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=2.0)
            if not ready:
                if _cancelled(store, job_id):
                    log.info("job %d: cancelled; %d Ray task(s) still out are stopped", job_id, len(pending))
                    report.cancelled = True
                    break
                continue
            ref = ready[0]
            state, group = pending.pop(ref)
            try:
                state.add(group, ray.get(ref), None)
            except ray.exceptions.RayError as err:  # the worker died, or the task could not run at all
                log.warning("job %d step %s: Ray task failed: %s", job_id, state.name, _first_line(err))
                state.add(group, None, f"Ray task failed: {_first_line(err)}")
            if state.waiting:
                continue
            del units[state.name]
            merged = state.merged()
            record_unit(
                store, job_id, state.name, state.step, n_items, state.todo, merged, report,
                where=" (ray)",
            )  # fmt: skip
            finished += 1
            for problem in merged.problems:  # a unit failed whole is logged by record_unit
                log.warning("job %d step %s: %s", job_id, state.name, problem)
            log.info("job %d step %s: back from Ray (%d of %d checkpoint(s) finished)", job_id, state.name, finished,
                     n_units)  # fmt: skip
            if progress:
                progress(finished, n_units, state.name, n_items, n_items, "done")
    finally:
        for ref in pending:  # cancelled or interrupted: the next run redoes these units whole
            ray.cancel(ref, force=True)
        for state in units.values():
            log.warning("job %d step %s: interrupted; queued again", job_id, state.name)
            store.set_unit(UnitUpdate(job_id, state.name, "queued", 0, n_items, "interrupted"))
        if started:
            ray.shutdown()
    finish_job(store, job_id, report)
    log.info("%s", report.summary())
    return report
