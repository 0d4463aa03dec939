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
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

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
    failed: list[str] | None = None
    cancelled: bool = False

    def summary(self) -> str:
        failed = len(self.failed or [])
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
    for step, fp in zip(ckpts["step"], ckpts["fingerprint"], strict=True):
        keys = store.cached_keys(spec.run, int(step), fp)
        missing += any(not it.is_cached(keys) for it in items)
    return missing


def _dtype(name: str | None) -> torch.dtype | None:
    return None if name is None else getattr(torch, name)


def _probe_batches(probe, spec: JobSpec, pad_id: int = 0) -> list[dict[str, torch.Tensor]]:
    """The fixed probe batches every checkpoint of the run is measured on.

    At most ``batch_size * metric_batches`` samples in all, shared round-robin among the
    domains (sorted by name) so that every domain is represented (while there are no more
    domains than samples allowed); a domain with fewer samples than its share leaves the
    rest to the others. Each domain gives its first samples in probe order. Batches never
    mix domains, and each carries ``domain_id`` (B,) long: the domain's index in sorted
    name order (0..D-1), which ``gradient_alignment`` reads and other metrics ignore.
    Padding is ``pad_id`` (the model's, :func:`analysis.models.pad_token_id`) under the
    attention mask.
    """
    from analysis.evals.heldout import right_pad

    names = sorted(probe.domains)
    sizes = [len(probe.domains[name]) for name in names]
    take = [0] * len(names)
    left = spec.batch_size * spec.metric_batches
    while left > 0 and any(t < n for t, n in zip(take, sizes, strict=True)):
        for i, n in enumerate(sizes):
            if left > 0 and take[i] < n:
                take[i] += 1
                left -= 1
    batches = []
    for index, (name, count) in enumerate(zip(names, take, strict=True)):
        seqs = [list(s) for s in probe.domains[name][:count]]
        for i in range(0, count, spec.batch_size):
            ids, mask = right_pad(seqs[i : i + spec.batch_size], pad_id)
            domain = torch.full((ids.shape[0],), index, dtype=torch.long)
            batches.append({"input_ids": ids, "attention_mask": mask, "domain_id": domain})
    if not batches:
        raise ValueError(f"{spec.data}: no usable probe samples (each needs at least 2 tokens)")
    return batches


def _compute_item(
    item: Item, model, tokenizer, spec: JobSpec, ctx: dict, run: str, step: int, fp: str,
    progress: Callable[[int, int], None] | None = None,
):  # fmt: skip
    """Rows and per-sample records of one item on one loaded checkpoint.

    ``tokenizer`` may be a :class:`analysis.models.LazyTokenizer`: the items that need one
    (lm-eval tasks, proxies) load it, and fail alone when the checkpoint has none.
    ``progress(i, n)`` follows a long metric's probes or iterations.
    """
    from analysis.models import resolve_tokenizer

    versions = ctx["versions"]
    rows: list[ResultRow] = []
    samples: list[SampleRow] = []

    def row(metric: str, value, stderr=None, n=None, code_version: str = "", higher_is_better=None) -> ResultRow:
        return ResultRow(
            run, step, metric, value, fp, stderr, n, item.params, code_version, versions,
            higher_is_better=higher_is_better,
        )  # fmt: skip

    if item.kind == "lm_eval":
        from analysis.evals.lmeval import run_lm_eval

        tok = resolve_tokenizer(tokenizer, f"the prompts of {item.name}")
        out = run_lm_eval(
            model,
            tok,
            [item.name],
            batch_size=spec.batch_size,
            limit=spec.limit,
            num_fewshot=spec.num_fewshot,
            log_samples=spec.log_samples,
            seed=spec.seed,
            bootstrap_iters=spec.bootstrap_iters,
        )
        for r in out.rows:
            version = f"{r.task_version or ''};n_shot={r.n_shot}"
            rows.append(row(f"{r.task}/{r.metric}", r.value, r.stderr, r.n, version, r.higher_is_better))
        for s in out.samples:
            record = {"target": s.target, "prompt": s.prompt, "response": s.response}
            if s.choices is not None:
                record["choices"] = list(s.choices)
                record["loglikelihoods"] = list(s.loglikelihoods or ())
            metric = f"{s.task}/{s.metric}"
            samples.append(SampleRow(run, step, metric, item.params_hash, str(s.doc_id), s.value, record))
        # The accuracy's continuous counterparts, from the same per-choice log-likelihoods: no second pass.
        from analysis.evals.continuous import continuous_metrics

        encode = lambda text: tok.encode(text, add_special_tokens=False)  # noqa: E731
        for c in continuous_metrics(out.samples, encode):
            rows.append(row(c.metric, c.value, c.stderr, c.n, "continuous-1"))
    elif item.kind == "heldout":
        from analysis.evals.heldout import heldout_loss

        for domain, res in heldout_loss(model, ctx["probe"], batch_size=spec.batch_size).items():
            rows.append(row(f"{domain}/heldout_loss", res.mean_nll, res.stderr, res.n_samples, "1"))
            rows.append(row(f"{domain}/heldout_perplexity", res.perplexity, None, res.n_samples, "1"))
            if res.bits_per_byte is not None:
                rows.append(row(f"{domain}/heldout_bpb", res.bits_per_byte, None, res.n_samples, "1"))
    elif item.kind == "proxy":
        from analysis.evals.proxy import proxy_metrics
        from analysis.evals.tasks import bundled_proxy_items

        pairs = bundled_proxy_items(item.name)[: spec.limit or None]
        proxy_tokenizer = resolve_tokenizer(tokenizer, f"the solutions of {item.name}")
        for name, res in proxy_metrics(model, proxy_tokenizer, pairs, batch_size=spec.batch_size).items():
            rows.append(row(f"{item.name}/{name}", res.value, res.stderr, res.n, "1"))
    elif item.kind == "samples":
        from analysis.memorisation import sample_records
        from analysis.metrics.pathways import routing_profile

        for domain, seqs in sorted(ctx["probe"].domains.items()):
            batches = _plain_batches(seqs, spec.batch_size, ctx.get("pad_id", 0))
            profile = routing_profile(model, batches, device=ctx["device"], keep_nll=True)
            records = sample_records(
                profile, threshold=item.params["threshold"], answer_tokens=item.params["answer_tokens"]
            )
            metric = f"{domain}/sample_loss"
            for i, record in enumerate(records):
                samples.append(SampleRow(run, step, metric, item.params_hash, str(i), record["loss"], record))
            losses = np.array([r["loss"] for r in records])
            stderr = float(losses.std(ddof=1) / np.sqrt(len(losses))) if len(losses) > 1 else None
            rows.append(row(metric, float(losses.mean()), stderr, len(losses), item.params["version"]))
    elif item.kind == "finetune":
        from analysis.finetune.probe import probe_item

        for r in probe_item(item, model, tokenizer, spec, ctx, run, step, progress):
            rows.append(row(r.metric, r.value, r.stderr, r.n, item.params["version"], r.higher_is_better))
    else:
        from analysis.metrics.registry import compute, compute_from_profile, get_metric

        config = item.params["config"]
        # The metric's own seed (--param METRIC.seed=N) is in its params; older jobs used the job's.
        seed = item.params.get("seed", spec.seed)
        if get_metric(item.name).from_profile is not None:
            # Routing metrics share one forward pass per checkpoint.
            if "routing" not in ctx:
                from analysis.metrics.pathways import routing_profile

                ctx["routing"] = routing_profile(model, ctx["batches"], device=ctx["device"])
            res = compute_from_profile(item.name, ctx["routing"], config, seed=seed)
        else:
            res = compute(item.name, model, ctx["batches"], config, device=ctx["device"], seed=seed, progress=progress)
        # converged is None unless the metric is iterative (an eigenvalue); the store keeps it.
        rows.append(
            replace(row(item.name, res.value, res.stderr, res.n, item.params["version"]), converged=res.converged)
        )
    return rows, samples


def _plain_batches(seqs, batch_size: int, pad_id: int = 0) -> list[dict[str, torch.Tensor]]:
    """Right-padded batches of ``seqs`` in order (sample i of the output is seqs[i])."""
    from analysis.evals.heldout import right_pad

    batches = []
    for i in range(0, len(seqs), batch_size):
        ids, mask = right_pad([list(s) for s in seqs[i : i + batch_size]], pad_id)
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def _load(path: str, spec: JobSpec, trust_remote_code: bool):
    from analysis.models import load_model
    from analysis.runs.local import as_model_folder

    LOADS["count"] += 1
    scratch = Path(os.environ.get("TMPDIR", "/tmp")) / f"cdd-load-{os.getpid()}"
    folder = as_model_folder(path, scratch)
    # The tokenizer loads when an item needs it: metrics on input_ids probes run on raw training
    # checkpoints that have no tokenizer files.
    return load_model(
        folder, device=spec.device, dtype=_dtype(spec.dtype), trust_remote_code=trust_remote_code, lazy_tokenizer=True
    )


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
) -> UnitOutput:
    """Load one checkpoint and compute ``todo`` on it. Writes nothing: the caller stores the output.

    ``on_item(done, what)`` is called as each item starts (``what`` its label) and, inside a
    long metric, after each probe or iteration (``what`` like "hessian_trace probe 12/32").

    Pure with respect to the cache, so any process (this one, a pool, a Ray task) can run it
    while a single writer commits the results.
    """
    started = time.monotonic()
    out = UnitOutput()
    versions = versions if versions is not None else library_versions()
    model = None
    try:
        model, tokenizer = _load(path, spec, trust_remote_code)
        from analysis.models import pad_token_id

        ctx = {"versions": versions, "device": next(model.parameters()).device, "pad_id": pad_token_id(model)}
        ctx["checkpoint"] = path  # the fine-tune probe refuses to keep copies next to it
        if any(it.kind in ("heldout", "metric", "samples", "finetune") for it in todo):
            from analysis.evals.heldout import load_probe_set

            data = next(it.params["data"] for it in todo if "data" in it.params)
            ctx["probe"] = load_probe_set(data, tokenizer, spec.max_length, max_samples=spec.max_samples)
            ctx["batches"] = _probe_batches(ctx["probe"], spec, ctx["pad_id"])
        for item in todo:
            if on_item:
                on_item(done, item.label)
            try:
                rows, samples = _compute_item(
                    item, model, tokenizer, spec, ctx, spec.run, step, fingerprint,
                    progress=_within(on_item, done, item) if on_item else None,
                )  # fmt: skip
                out.rows += rows
                out.samples += samples
            except (ValueError, KeyError, RuntimeError, torch.OutOfMemoryError) as err:
                out.problems.append(f"{item.label}: {_first_line(err)}")
            done += 1
    except (ValueError, OSError, RuntimeError, torch.OutOfMemoryError) as err:
        out.error = _first_line(err)
    finally:
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    out.seconds = time.monotonic() - started
    return out


def _within(on_item: Callable[[int, str], None], done: int, item: Item) -> Callable[[int, int], None]:
    """progress(i, n) of a long metric, reported through on_item as "<label> <unit> i/n"."""
    from analysis.metrics.registry import progress_unit

    unit = progress_unit(item.name) if item.kind == "metric" else "step"

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
    jobs = store.jobs(limit=1_000_000)
    match = jobs[jobs["id"] == job_id]
    if not len(match):
        raise ValueError(f"no job {job_id} in {store.path}; list jobs with `python -m analysis jobs`")
    spec = JobSpec.from_dict(json.loads(match["spec"].iloc[0]))
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
    todo = [it for it in plan.items if not it.is_cached(keys)]
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
    jobs = store.jobs(limit=1_000_000)
    return bool((jobs.loc[jobs["id"] == job_id, "status"] == "cancelled").any())


def next_job(store: Store) -> int | None:
    """The oldest job a worker should run: queued, or left running by a worker that died."""
    jobs = store.jobs(limit=1_000_000)
    if not len(jobs):
        return None
    for rec in jobs.sort_values("id").itertuples():
        if rec.status == "queued":
            return int(rec.id)
        if rec.status == "running" and not process_alive(rec.worker_pid):
            return int(rec.id)
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
