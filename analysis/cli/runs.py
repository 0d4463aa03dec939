"""The ``add-run``, ``runs``, ``query`` and ``migrate`` commands: registering runs and reading the cache."""

from __future__ import annotations

import argparse
import json
import sys

from analysis.store import Store


def cmd_add_run(args: argparse.Namespace) -> int:
    """add-run: register a local checkpoint folder or hf://ORG/MODEL and print what was found."""
    from analysis.runs.add import add_run

    result = add_run(
        Store(args.db), args.path, name=args.name, log=args.log, revisions=args.revisions,
        revision_filter=args.revision_filter, step_map=args.step_map, steps_per_checkpoint=args.steps_per_checkpoint,
        trust_remote_code=args.trust_remote_code,
    )  # fmt: skip
    for problem in result.problems:
        print(f"warning: {problem}", file=sys.stderr)
    print(result.summary())
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    """runs: list the registered runs."""
    frame = Store(args.db).runs()
    if not len(frame):
        print(f"no runs in {args.db}; add one with `python -m analysis add-run PATH` or `python -m analysis demo`")
        return 0
    cols = ["name", "checkpoints", "first_step", "last_step", "log_metrics", "results", "source"]
    print(frame[cols].to_string(index=False))
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    """query: print the runs' cached values as a long table (table, CSV or JSON)."""
    store = Store(args.db)
    known = set(store.runs().get("name", []))
    missing = [r for r in args.run if r not in known]
    if missing:
        hint = ", ".join(sorted(known)) or "none; add one with add-run"
        raise ValueError(f"unknown run {missing[0]!r} in {args.db}; known runs: {hint}")
    from analysis.settings import label_settings

    # Every setting's rows are printed; ``setting`` (empty when a metric has only one) tells them apart.
    frame = label_settings(store.long_table(args.run))
    if args.metric:
        frame = frame[frame["metric"].isin(args.metric)]
    frame = frame[["run", "step", "tokens", "metric", "value", "stderr", "setting"]]
    if args.format == "csv":
        frame.to_csv(sys.stdout, index=False)
    elif args.format == "json":
        # Through Python floats, not DataFrame.to_json, which rounds to 10 significant digits.
        records = frame.astype(object).where(frame.notna(), None).to_dict(orient="records")
        json.dump(records, sys.stdout, default=int)
        print()
    else:
        print(frame.to_string(index=False))
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    """migrate: create or upgrade the cache schema and print its version."""
    version = Store(args.db).migrate()
    print(f"{args.db}: schema version {version}")
    return 0
