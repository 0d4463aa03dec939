"""The ``import-evals``, ``export`` and ``import-cache`` commands: lm-eval result files in, cache tables out and
back in."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from analysis.store import Store


def cmd_import_evals(args: argparse.Namespace) -> int:
    """import-evals: read lm-eval result files and write their scores into a run, created when new."""
    from analysis.evals.importing import plan_import
    from analysis.evals.lmeval import parse_results_file
    from analysis.runs.base import Run

    store = Store(args.db)
    known = set(store.runs().get("name", []))
    by_step: dict[int, str] = {}  # step -> fingerprint of the run's registered checkpoints
    if args.run in known and len(ckpts := store.checkpoints(args.run)):
        by_step = dict(zip(ckpts["step"], ckpts["fingerprint"], strict=True))
    files = sorted(Path(args.path).rglob("*.json")) if Path(args.path).is_dir() else [Path(args.path)]
    if not files:
        raise ValueError(f"{args.path}: no .json result files found; point at an lm-eval output file or folder")
    # Every file is read before anything is written, and everything (the run too, when it is new) is
    # written in one transaction: one bad file, or a kill midway, imports nothing and creates no run.
    parsed = [parse_results_file(file, step=args.step) for file in files]
    plan = plan_import(parsed, args.run, by_step)
    for imported in parsed:
        for problem in imported.problems:
            print(f"warning: {problem}", file=sys.stderr)  # each names its file
        derived = f" (+{len(imported.derived)} group means)" if imported.derived else ""
        what = f"step {imported.step} (from {imported.step_source}), {len(imported.rows)} values{derived}"
        print(f"{imported.path}: {what}")
    for line in plan.warnings:
        print(f"warning: {line}", file=sys.stderr)
    source = Path(args.path).resolve()
    new_runs = [] if args.run in known else [Run(args.run, f"imported:{source}", config={"imported_from": str(source)})]
    written = store.write_results(plan.rows, new_checkpoints=plan.new_checkpoints, new_runs=new_runs)
    if new_runs:
        print(f"created run {args.run!r} (no local checkpoints; imported results only)")
    print(f"imported {written} values into run {args.run!r}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """export: write the cache's tables (or some runs') as Parquet files with a manifest."""
    from analysis.exchange import export_parquet

    manifest = export_parquet(Store(args.db), args.out, runs=args.run)
    counts = ", ".join(f"{table} {n}" for table, n in manifest["rows"].items())
    print(f"exported to {args.out}: {counts}")
    return 0


def cmd_import_cache(args: argparse.Namespace) -> int:
    """import-cache: merge a folder written by export into the cache."""
    from analysis.exchange import import_parquet

    print(import_parquet(Store(args.db), args.folder).summary())
    return 0
