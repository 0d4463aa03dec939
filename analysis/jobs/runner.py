"""Execute a job: one unit per checkpoint, cache first, each unit's results in one transaction.

For each checkpoint the runner asks the store what is already cached for its current
fingerprint; only the missing items are computed, so asking twice costs one read. The
checkpoint is loaded once and handed, as an object, to every item. All rows of a unit are
written together with the unit's status, so a worker killed mid-unit leaves nothing of that
unit visible and the next run redoes just that unit. A failing checkpoint (corrupt weights,
out of memory) marks its unit failed with the reason, and the job goes on.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from analysis.jobs.kinds import UnitContext, WorkKind, adopt, get_kind
from analysis.jobs.precision import load_dtype, with_dtypes
from analysis.jobs.spec import Item, JobSpec, plan_items
from analysis.store import ResultRow, SampleRow, Store, StoreLockedError, UnitUpdate, library_versions

log = logging.getLogger(__name__)

# progress(unit_index, n_units, unit_name, item_done, item_total, status)
Progress = Callable[[int, int, str, int, int, str], None]

# Counts checkpoint loads in this process: tests use it to prove a cached request loads nothing.
LOADS = {"count": 0}


@dataclass
class JobReport:
    """What a job run did."""

    job_id: int
    units: int = 0
    computed: int = 0  # items computed
    cached: int = 0  # items found in the cache
    failed: list[str] = field(default_factory=list)  # one line per failed checkpoint or item
    cancelled: bool = False

    def summary(self) -> str:
        failed = len(self.failed)
        return (
            f"job {self.job_id}: {self.units} checkpoints, {self.computed} computed, "
            f"{self.cached} already cached, {failed} failed" + (" (cancelled)" if self.cancelled else "")
        )


def submit(store: Store, spec: JobSpec) -> int:
    """Check a request against the store and queue it; returns the job id."""
    ckpts = store.checkpoints(spec.run)
    if not len(ckpts):
        known = ", ".join(store.runs().get("name", [])) or "none; add one with add-run"
        raise ValueError(f"run {spec.run!r} has no checkpoints in {store.path}; known runs: {known}")
    steps = list(ckpts["step"])
    if spec.steps is not None:
        missing = sorted(set(spec.steps) - set(steps))
        if missing:
            raise ValueError(f"run {spec.run!r} has no checkpoint at step {missing[0]}; it has steps {steps}")
        steps = sorted(set(spec.steps))
    if spec.tasks:
        from analysis.evals.tasks import resolve_tasks

        resolve_tasks(list(spec.tasks))  # unknown names fail here ("did you mean"), before anything is queued
    items = plan_items(spec)  # validates metric names and probe data
    return store.create_job(spec.run, spec.to_dict(), [(str(s), len(items)) for s in steps])


def missing_units(store: Store, spec: JobSpec) -> int:
    """How many checkpoints of ``spec`` still lack something it asks for (0: all cached). Loads nothing."""
    items = plan_items(spec)
    ckpts = store.checkpoints(spec.run)
    if spec.steps is not None:
        ckpts = ckpts[ckpts["step"].isin(spec.steps)]
    missing = 0
    for step, path, fp in zip(ckpts["step"], ckpts["path"], ckpts["fingerprint"], strict=True):
        keys = store.cached_keys(spec.run, int(step), fp)
        missing += any(not it.is_cached(keys) for it in with_dtypes(items, spec, path))
    return missing


def _load(path: str, spec: JobSpec, trust_remote_code: bool, todo: list[Item] | tuple[Item, ...] = ()):
    """Load a checkpoint for ``todo``, in the dtype its items were keyed with (:mod:`analysis.jobs.precision`)."""
    from analysis.models import load_model
    from analysis.runs.local import as_model_folder

    LOADS["count"] += 1
    scratch = Path(os.environ.get("TMPDIR", "/tmp")) / f"cdd-load-{os.getpid()}"
    folder = as_model_folder(path, scratch)
    # The tokenizer loads when an item needs it: metrics on input_ids probes run on raw training
    # checkpoints that have no tokenizer files.
    dtype = load_dtype(todo, spec)
    return load_model(folder, device=spec.device, dtype=dtype, trust_remote_code=trust_remote_code, lazy_tokenizer=True)


@dataclass
class UnitOutput:
    """What computing one checkpoint unit gave: rows to write, or why the checkpoint failed."""

    rows: list[ResultRow] = field(default_factory=list)
    samples: list[SampleRow] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # items that failed (the others still count)
    error: str | None = None  # the whole unit failed (the checkpoint did not load, out of memory)
    seconds: float = 0.0
    # Some items never ran (their Ray task died): the rows of the others are kept, and the unit stays
    # failed, so running the job again computes just the missing items.
    incomplete: bool = False


def compute_unit(
    spec: JobSpec,
    todo: list[Item],
    path: str,
    fingerprint: str,
    step: int,
    trust_remote_code: bool = False,
    versions: dict | None = None,
    *,
    done: int = 0,
    on_item: Callable[[int, str], None] | None = None,
    kinds: Iterable[WorkKind] = (),
) -> UnitOutput:
    """Load one checkpoint and compute ``todo`` on it. Writes nothing: the caller stores the output.

    ``on_item(done, what)`` is called as each item starts (``what`` its label) and, inside a
    long metric, after each probe or iteration (``what`` like "hessian_trace probe 12/32").
    ``kinds``: work kinds this process may lack (a Ray worker); those it has stay as they are.

    Pure with respect to the cache, so any process (this one, a pool, a Ray task) can run it
    while a single writer commits the results.
    """
    started = time.monotonic()
    out = UnitOutput()
    adopt(kinds)
    versions = versions if versions is not None else library_versions()
    model = ctx = None
    try:
        model, tokenizer = _load(path, spec, trust_remote_code, todo)
        data = next((it.data for it in todo if it.data), None)
        ctx = UnitContext(spec, model, tokenizer, step, fingerprint, path, versions, data)
        if any(get_kind(it.kind).uses_probe for it in todo):
            _ = ctx.batches  # read before any item, so a broken probe file fails the unit with one reason
        for item in todo:
            if on_item:
                on_item(done, item.label)
            try:
                progress = _within(on_item, done, item) if on_item else None
                rows, samples = get_kind(item.kind).compute(item, ctx, progress)
                out.rows += rows
                out.samples += samples
            except (ValueError, KeyError, RuntimeError, torch.OutOfMemoryError) as err:
                out.problems.append(f"{item.label}: {_first_line(err)}")
            done += 1
    except (ValueError, OSError, RuntimeError, torch.OutOfMemoryError) as err:
        out.error = _first_line(err)
    finally:
        model = ctx = None  # the context holds the model and its probe tensors: free them before the next unit
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    out.seconds = time.monotonic() - started
    return out


def _within(on_item: Callable[[int, str], None], done: int, item: Item) -> Callable[[int, int], None]:
    """progress(i, n) of a long item, reported through on_item as "<label> <unit> i/n"."""
    unit = get_kind(item.kind).progress_unit(item)

    def report(i: int, n: int) -> None:
        on_item(done, f"{item.label} {unit} {i}/{n}")

    return report


@dataclass
class JobPlan:
    """A queued job read back from the cache: what every executor needs before computing units."""

    spec: JobSpec
    items: list[Item]
    units: pd.DataFrame  # unit, status, total, ...
    ckpts: pd.DataFrame  # indexed by step: path, fingerprint
    trust_remote_code: bool
    versions: dict


def load_job(store: Store, job_id: int) -> JobPlan:
    """Read job ``job_id`` and the checkpoints it covers; ValueError for an unknown id."""
    job = store.job(job_id)
    if job is None:
        raise ValueError(f"no job {job_id} in {store.path}; list jobs with `python -m analysis jobs`")
    spec = JobSpec.from_dict(job.spec)
    runs = store.runs()
    return JobPlan(
        spec=spec,
        items=plan_items(spec),
        units=store.job_units(job_id),
        ckpts=store.checkpoints(spec.run).set_index("step"),
        trust_remote_code=bool(runs.loc[runs["name"] == spec.run, "trust_remote_code"].any()),
        versions=library_versions(),
    )


def prepare_unit(store: Store, job_id: int, plan: JobPlan, unit, report: JobReport):
    """What one unit still has to compute: (step, path, fingerprint, todo), or None when nothing.

    A finished unit counts as cached; a unit whose checkpoint is gone fails; a unit whose items
    are all cached is marked done (todo is then empty). Otherwise the unit is marked running.
    """
    n_items = len(plan.items)
    report.units += 1
    if unit.status == "done":
        report.cached += unit.total
        return None
    step = int(unit.unit)
    if step not in plan.ckpts.index:
        _fail(store, job_id, unit.unit, n_items, "checkpoint no longer registered", report)
        return None
    path, fp = plan.ckpts.loc[step, "path"], plan.ckpts.loc[step, "fingerprint"]
    keys = store.cached_keys(plan.spec.run, step, fp)
    # Each item's dtype (a cache key) depends on how this checkpoint is stored: resolved here, per checkpoint.
    todo = [it for it in with_dtypes(plan.items, plan.spec, path) if not it.is_cached(keys)]
    report.cached += n_items - len(todo)
    if not todo:
        store.set_unit(UnitUpdate(job_id, unit.unit, "done", n_items, n_items, "cached"))
    else:
        store.set_unit(UnitUpdate(job_id, unit.unit, "running", n_items - len(todo), n_items))
    return step, path, fp, todo


def record_unit(
    store: Store, job_id: int, unit: str, step: int, n_items: int, n_todo: int, out: UnitOutput, report: JobReport,
    where: str = "",
) -> None:  # fmt: skip
    """Write one computed unit: its rows and its status in one transaction, or the reason it failed."""
    if out.error is not None:
        _fail(store, job_id, unit, n_items, out.error, report)
        return
    status = "failed" if (out.problems and not out.rows) or out.incomplete else "done"
    message = "; ".join(out.problems) or f"{out.seconds:.1f} s{where}"
    store.write_results(out.rows, out.samples, unit=UnitUpdate(job_id, unit, status, n_items, n_items, message))
    report.computed += n_todo - len(out.problems)
    report.failed += [f"step {step}: {p}" for p in out.problems]


def finish_job(store: Store, job_id: int, report: JobReport) -> JobReport:
    final = "cancelled" if report.cancelled else ("failed" if report.failed and not report.computed else "done")
    store.set_job(job_id, final, report.summary())
    return report


def run_job(store: Store, job_id: int, *, progress: Progress | None = None, stop: Callable[[], bool] | None = None):
    """Run (or resume) a queued job to the end; returns a JobReport."""
    plan = load_job(store, job_id)
    spec, items = plan.spec, plan.items
    report = JobReport(job_id, failed=[])
    store.set_job(job_id, "running", worker_pid=os.getpid())
    n_units = len(plan.units)
    log.info("job %d: run %r, %d checkpoint(s), %d item(s) each", job_id, spec.run, n_units, len(items))
    last_note = {"at": 0.0}
    for index, unit in enumerate(plan.units.itertuples()):
        if (stop is not None and stop()) or _cancelled(store, job_id):
            log.info("job %d: cancelled before step %s", job_id, unit.unit)
            report.cancelled = True
            break
        prepared = prepare_unit(store, job_id, plan, unit, report)
        if prepared is None:
            continue
        step, path, fp, todo = prepared
        if not todo:
            log.info("job %d step %s: every item already cached", job_id, unit.unit)
            if progress:
                progress(index, n_units, unit.unit, len(items), len(items), "cached")
            continue
        log.info("job %d step %s: started, computing %s", job_id, unit.unit, ", ".join(it.label for it in todo))

        def item_progress(done: int, label: str, index: int = index, name: str = unit.unit) -> None:
            if progress:
                progress(index, n_units, name, done, len(items), label)
            _note_progress(store, job_id, name, done, len(items), label, last_note)

        out = compute_unit(
            spec, todo, path, fp, step, plan.trust_remote_code, plan.versions,
            done=len(items) - len(todo), on_item=item_progress,
        )  # fmt: skip
        record_unit(store, job_id, unit.unit, step, len(items), len(todo), out, report)
        for problem in out.problems:
            log.warning("job %d step %s: %s", job_id, unit.unit, problem)
        if out.error is None:
            log.info("job %d step %s: finished in %.1f s, %d value(s) stored", job_id, unit.unit, out.seconds,
                     len(out.rows))  # fmt: skip
        if progress:
            progress(index + 1, n_units, unit.unit, len(items), len(items), "done")
    finish_job(store, job_id, report)
    log.info("%s", report.summary())
    return report


# Seconds between two progress notes written to a running unit (each is a short write transaction).
NOTE_EVERY = 2.0


def _note_progress(store: Store, job_id: int, unit: str, done: int, total: int, what: str, last: dict) -> None:
    """Write what a running unit is doing ("hessian_trace probe 12/32") for the Jobs page, at most
    every NOTE_EVERY seconds; a cache busy with another writer just skips a note."""
    now = time.monotonic()
    if now - last["at"] < NOTE_EVERY:
        return
    last["at"] = now
    log.debug("job %d step %s: %s (%d/%d items done)", job_id, unit, what, done, total)
    try:
        store.set_unit(UnitUpdate(job_id, unit, "running", done, total, what))
    except StoreLockedError:  # best effort; the unit's result has its own transaction
        log.debug("job %d step %s: cache busy, progress note skipped", job_id, unit)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _fail(store: Store, job_id: int, unit: str, total: int, reason: str, report: JobReport) -> None:
    log.warning("job %d step %s: failed: %s", job_id, unit, reason)
    store.set_unit(UnitUpdate(job_id, unit, "failed", 0, total, reason))
    report.failed.append(f"step {unit}: {reason}")


def _cancelled(store: Store, job_id: int) -> bool:
    return store.job_status(job_id) == "cancelled"


def next_job(store: Store) -> int | None:
    """The oldest job a worker should run: queued, or left running by a worker that died."""
    for job in store.open_jobs():
        if job.status == "queued" or not process_alive(job.worker_pid):
            return job.id
    return None


def process_alive(pid) -> bool:
    """Whether a worker process still runs (a zombie does not count)."""
    if pid is None or pd.isna(pid):
        return False
    pid = int(pid)
    if pid == os.getpid():
        return False  # our own earlier run, interrupted
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (killed, not yet reaped) is not alive for our purposes.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return True


def serve(store: Store, *, poll: float = 2.0, once: bool = False, progress: Progress | None = None) -> int:
    """The worker loop: run queued jobs one after another; returns the number of jobs run."""
    log.info("worker %d serving jobs from %s%s", os.getpid(), store.path, " until the queue is empty" if once else "")
    ran = 0
    while True:
        job_id = next_job(store)
        if job_id is None:
            if once:
                log.info("queue empty; %d job(s) run", ran)
                return ran
            time.sleep(poll)
            continue
        log.info("job %d: picked up by worker %d", job_id, os.getpid())
        try:
            run_job(store, job_id, progress=progress)
        except Exception:
            # The worker's log is where a failed job is looked into; the command line still reports it.
            log.exception("job %d: stopped by an unexpected error", job_id)
            raise
        ran += 1
