"""The command line: ``python -m analysis <command> [--db PATH] ...``.

Bad input ends with one line on stderr that names the file and the fix, and a non-zero
exit code; never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from analysis.store import DEFAULT_DB, Store, StoreLockedError

DEMO_ROOT = Path("data/demo")


def _progress_bar(desc: str) -> Callable[[int, int], None]:
    """A callback(done, total) that drives one tqdm bar on stderr."""
    from tqdm import tqdm

    bar: dict = {}

    def update(done: int, total: int) -> None:
        if "bar" not in bar:
            bar["bar"] = tqdm(total=total, desc=desc, unit="step", file=sys.stderr, dynamic_ncols=True)
        b = bar["bar"]
        b.total = total
        b.n = done
        b.refresh()
        if done >= total:
            b.close()
            bar.clear()

    return update


def _register(store: Store, run, *, trust_remote_code: bool = False) -> int:
    """Register a loaded run, print what happened; return the exit code."""
    for problem in run.problems:
        print(f"warning: {problem}", file=sys.stderr)
    if not run.checkpoints and not len(run.log):
        print(f"error: {run.source}: no checkpoints and no training log found; nothing registered", file=sys.stderr)
        return 1
    report = store.register_run(run, trust_remote_code=trust_remote_code)
    steps = [c.step for c in run.checkpoints]
    span = f"steps {min(steps)}..{max(steps)}" if steps else "no checkpoints"
    print(
        f"registered run {report.run!r}: {report.checkpoints} checkpoints ({span}), "
        f"{report.new_checkpoints} new, {report.changed_checkpoints} changed, {report.log_rows} log values"
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from analysis.demo import build_demo
    from analysis.runs.load import load_run

    store = Store(args.db)
    root = Path(args.root)
    print(f"building the demo runs in {root} (cached: a finished run is not retrained)", file=sys.stderr)
    folders = build_demo(root, scale=args.scale, progress=_progress_bar("training"))
    code = 0
    for folder in folders:
        code |= _register(store, load_run(folder))
    return code


def cmd_add_run(args: argparse.Namespace) -> int:
    from analysis.runs.load import load_run

    run = load_run(args.path, name=args.name, log=args.log)
    return _register(Store(args.db), run, trust_remote_code=args.trust_remote_code)


def cmd_runs(args: argparse.Namespace) -> int:
    frame = Store(args.db).runs()
    if not len(frame):
        print(f"no runs in {args.db}; add one with `python -m analysis add-run PATH` or `python -m analysis demo`")
        return 0
    cols = ["name", "checkpoints", "first_step", "last_step", "log_metrics", "results", "source"]
    print(frame[cols].to_string(index=False))
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    store = Store(args.db)
    known = set(store.runs().get("name", []))
    missing = [r for r in args.run if r not in known]
    if missing:
        hint = ", ".join(sorted(known)) or "none; add one with add-run"
        raise ValueError(f"unknown run {missing[0]!r} in {args.db}; known runs: {hint}")
    frame = store.long_table(args.run)
    if args.metric:
        frame = frame[frame["metric"].isin(args.metric)]
    frame = frame[["run", "step", "tokens", "metric", "value", "stderr"]]
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
    version = Store(args.db).migrate()
    print(f"{args.db}: schema version {version}")
    return 0


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m analysis",
        description="Where pretraining loss stops predicting downstream ability: cache, compute, report.",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--db", type=Path, default=DEFAULT_DB, help=f"cache file (default {DEFAULT_DB})")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", parents=[common], help="train the two embedded demo runs and register them")
    p.add_argument("--root", default=str(DEMO_ROOT), help=f"where the demo checkpoints go (default {DEMO_ROOT})")
    p.add_argument("--scale", type=float, default=1.0, help="fraction of the training steps (for quick tries)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("add-run", parents=[common], help="register a local checkpoint folder or hf://ORG/MODEL")
    p.add_argument("path", help="run folder (checkpoint-N/, step_N/, ...) or hf://ORG/MODEL")
    p.add_argument("--name", help="run name (default: the folder name)")
    p.add_argument("--log", help="training log: trainer_state.json, CSV, JSONL or a TensorBoard event file")
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow this run's checkpoints to execute their own modelling code (off by default)",
    )
    p.set_defaults(func=cmd_add_run)

    p = sub.add_parser("runs", parents=[common], help="list the registered runs")
    p.set_defaults(func=cmd_runs)

    p = sub.add_parser("query", parents=[common], help="print cached values as a long table")
    p.add_argument("--run", action="append", required=True, help="run name (repeat for several)")
    p.add_argument("--metric", type=_split, help="only these metrics (comma-separated)")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")
    p.set_defaults(func=cmd_query)

    p = sub.add_parser("migrate", parents=[common], help="create or upgrade the cache schema")
    p.set_defaults(func=cmd_migrate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, KeyError, FileNotFoundError, StoreLockedError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished units are kept in the cache", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
