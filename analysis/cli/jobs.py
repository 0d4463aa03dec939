"""The ``eval``, ``worker`` and ``jobs`` commands: computing what a run's checkpoints lack, here, queued or
under Ray."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from analysis.cli.common import unit_bar
from analysis.store import Store


def spec_from_args(args: argparse.Namespace):
    """The job the eval flags describe; ``--param METRIC.KEY=VALUE`` items become per-metric settings."""
    from analysis.jobs import JobSpec

    metric_params: dict[str, dict[str, str]] = {}
    for item in args.param or []:
        key, sep, value = item.partition("=")
        metric, dot, field_name = key.partition(".")
        if not sep or not dot:
            raise ValueError(f"--param {item!r}: write METRIC.KEY=VALUE, e.g. hessian_trace.n_probes=16")
        metric_params.setdefault(metric, {})[field_name] = value
    if getattr(args, "keep", None):  # where the fine-tune probe saves its fine-tuned copies (not a cache key)
        metric_params.setdefault("finetune", {})["keep"] = str(Path(args.keep).expanduser().resolve())
    return JobSpec(
        run=args.run,
        steps=tuple(int(s) for s in args.steps) if args.steps else None,
        tasks=tuple(args.tasks or ()),
        metrics=tuple(args.metrics or ()),
        data=args.data,
        limit=args.limit,
        num_fewshot=args.num_fewshot,
        batch_size=args.batch_size,
        seed=args.seed,
        device=args.device,
        dtype=args.dtype,
        metric_params=metric_params,
    )


def cmd_eval(args: argparse.Namespace) -> int:
    """eval: queue a job for what the run lacks, then run it here (or under Ray) unless ``--queue``."""
    from analysis.jobs import run_job, submit

    store = Store(args.db)
    job_id = submit(store, spec_from_args(args))
    if args.queue:
        print(f"queued job {job_id}; run `python -m analysis worker --db {args.db}` to execute it")
        return 0
    if args.executor == "ray":
        from analysis.jobs.ray_executor import run_job_ray

        report = run_job_ray(
            store, job_id, args.ray_address, args.ray_gpus_per_unit, split=args.ray_split, progress=unit_bar()
        )
    else:
        report = run_job(store, job_id, progress=unit_bar())
    print(report.summary())
    for failure in report.failed or []:
        print(f"failed: {failure}", file=sys.stderr)
    return 1 if report.failed and not report.computed and not report.cached else 0


def cmd_worker(args: argparse.Namespace) -> int:
    """worker: serve queued jobs, the single writer, until interrupted (``--once``: until the queue is empty)."""
    import logging

    from analysis.jobs import serve
    from analysis.logs import worker_log_path

    # Progress goes to the log (stderr and the worker's file, set up in main), not a progress bar.
    # The command line's logger, named as it always was (not this module's __name__), so log lines keep their source.
    log = logging.getLogger("analysis.__main__")
    log.info("worker log: %s (Ctrl-C to stop)", worker_log_path(args.db, os.getpid()))
    ran = serve(Store(args.db), poll=args.poll, once=args.once)
    print(f"ran {ran} job(s)")
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    """jobs: list the jobs and their progress."""
    jobs = Store(args.db).jobs()
    if not len(jobs):
        print("no jobs")
        return 0
    cols = ["id", "run", "status", "units_done", "units", "units_failed", "items_done", "items_total", "message"]
    print(jobs[cols].to_string(index=False))
    return 0
