"""The ``demo`` command: the embedded demo's shipped results, its trained checkpoints, or a rebuild of both."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from analysis.cli.common import progress_bar, register_loaded_run, unit_bar
from analysis.store import Store

DEMO_ROOT = Path("data/demo")


def write_demo_data_files(*, force: bool = False) -> None:
    """The demo's task data and probe sets, written from the demo split when missing (always with ``force``)."""
    from analysis.demo import DEMO_RUNS, write_task_files
    from analysis.evals.probes import write_modarith_probes
    from analysis.evals.tasks import DEFAULT_DATA_DIR
    from analysis.jobs.spec import DEFAULT_PROBES

    tasks = DEFAULT_DATA_DIR / "modarith"
    if force or not (tasks / "heldout.jsonl").is_file() or not (tasks / "train.jsonl").is_file():
        write_task_files(tasks, DEMO_RUNS["grokking"])
    if force or not (DEFAULT_PROBES / "heldout.jsonl").is_file():
        write_modarith_probes(DEFAULT_PROBES)


def cmd_demo(args: argparse.Namespace) -> int:
    """The demo: the shipped results (default), trained checkpoints (--train), or a full rebuild (--rebuild)."""
    store = Store(args.db)
    root = Path(args.root)
    if args.rebuild:
        return _demo_rebuild(store, root, args)
    if args.train:
        return _demo_train(store, root, args)
    from analysis.demo_data import SHIPPED_DIR, import_demo, missing_demo_runs, outdated_demo_runs

    outdated = outdated_demo_runs(store) if (SHIPPED_DIR / "manifest.json").is_file() else []
    if outdated:
        print(
            f"replacing {', '.join(outdated)} in {args.db}: cached from an earlier version of the demo (other "
            "checkpoints than today's); your other runs are untouched",
            file=sys.stderr,
        )
        for name in outdated:
            store.delete_run(name)
    missing = missing_demo_runs(store)
    if not missing:
        print(
            f"the demo runs are in {args.db}; `python -m analysis demo --train` builds their checkpoints",
            file=sys.stderr,
        )
        return 0
    if not (SHIPPED_DIR / "manifest.json").is_file():
        print(f"warning: no shipped demo results in {SHIPPED_DIR}; training the demo runs instead", file=sys.stderr)
        return _demo_train(store, root, args)
    write_demo_data_files()
    start = time.monotonic()
    report = import_demo(store, root)
    print(
        f"imported the shipped demo results into {args.db} in {time.monotonic() - start:.1f} s: {report.summary()}\n"
        f"`python -m analysis demo --train` builds the demo checkpoints to evaluate them yourself",
        file=sys.stderr,
    )
    return 0


def _demo_rebuild(store: Store, root: Path, args: argparse.Namespace) -> int:
    """Retrain both demo runs from scratch, compute every demo evaluation, rewrite the shipped results."""
    from analysis.demo_data import SHIPPED_DIR, import_demo, rebuild

    out = Path(args.out) if args.out else SHIPPED_DIR
    print(
        f"rebuilding the demo from scratch in {root}, results to {out} (tens of minutes on a laptop CPU)",
        file=sys.stderr,
    )
    write_demo_data_files(force=True)  # from the current split: the evaluation reads them
    seconds = rebuild(
        root, out, scale=args.scale, progress=progress_bar("training"),
        eval_progress=progress_bar("evaluating", unit="ckpt"), finetune=not args.no_finetune,
    )  # fmt: skip
    known = set(store.runs().get("name", []))
    from analysis.demo import DEMO_RUNS

    for name in DEMO_RUNS:
        if name in known:
            store.delete_run(name)  # the rebuilt runs replace the old ones
    import_demo(store, root, out)
    print(f"rebuilt the demo in {seconds / 60:.1f} minutes; {out} rewritten and imported into {args.db}")
    return 0


def _demo_train(store: Store, root: Path, args: argparse.Namespace) -> int:
    """Train (or keep) the demo checkpoints, register them, queue or run their evaluation."""
    from analysis.demo import DEMO_RUNS, build_demo, is_complete
    from analysis.runs.load import load_run

    print(f"building the demo runs in {root} (cached: a finished run is not retrained)", file=sys.stderr)
    retrained = {name for name, cfg in DEMO_RUNS.items() if not is_complete(root / name, cfg.scaled(args.scale))}
    folders = build_demo(root, scale=args.scale, progress=progress_bar("training"))
    write_demo_data_files()
    known = set(store.runs().get("name", []))
    code = 0
    for folder in folders:
        if folder.name in retrained and folder.name in known:
            store.delete_run(folder.name)  # a retrained run is a new run: nothing of the old one applies
        code |= register_loaded_run(store, load_run(folder))
    if code or args.no_eval:
        return code
    from analysis.demo import demo_eval_spec
    from analysis.jobs import run_job, submit
    from analysis.jobs.runner import missing_units

    for folder in folders:
        spec = demo_eval_spec(folder.name)
        todo = missing_units(store, spec)
        if not todo:
            print(f"{folder.name}: every demo evaluation is cached", file=sys.stderr)
            continue
        job_id = submit(store, spec)
        if not args.wait:
            print(
                f"{folder.name}: queued job {job_id} ({todo} checkpoints to evaluate); "
                f"`python -m analysis worker --db {args.db} --once` runs it (`make run` starts one)"
            )
            continue
        report = run_job(store, job_id, progress=unit_bar())
        print(report.summary())
        for failure in report.failed or []:
            print(f"failed: {failure}", file=sys.stderr)
        code |= 1 if report.failed else 0
    return code
