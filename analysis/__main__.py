"""The command line: ``python -m analysis <command> [--db PATH] ...``.

Bad input ends with one line on stderr that names the file and the fix, and a non-zero
exit code; never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

from analysis.store import DEFAULT_DB, Store, StoreLockedError

if TYPE_CHECKING:
    import pandas as pd

DEMO_ROOT = Path("data/demo")


def _progress_bar(desc: str) -> Callable[[int, int], None]:
    """A callback(done, total) that drives one tqdm bar on stderr."""
    from tqdm import tqdm

    bar: dict = {}

    def update(done: int, total: int) -> None:
        if bar.get("closed"):
            return
        if "bar" not in bar:
            bar["bar"] = tqdm(total=total, desc=desc, unit="step", file=sys.stderr, dynamic_ncols=True)
        b = bar["bar"]
        b.total = total
        b.n = done
        b.refresh()
        if done >= total:
            b.close()
            bar["closed"] = True

    return update


def _register(store: Store, run, *, trust_remote_code: bool = False) -> int:
    """Register a loaded run, print what happened; return the exit code."""
    for problem in run.problems:
        print(f"warning: {problem}", file=sys.stderr)
    if not run.checkpoints and not len(run.log):
        print(f"error: {run.source}: no checkpoints and no training log found; nothing registered", file=sys.stderr)
        return 1
    from analysis.runs.add import AddResult

    report = store.register_run(run, trust_remote_code=trust_remote_code)
    print(AddResult(report, tuple(c.step for c in run.checkpoints)).summary())
    return 0


def _demo_data_files() -> None:
    """The demo's task data and probe sets, written from the demo split when missing."""
    from analysis.demo import DEMO_RUNS, write_task_files
    from analysis.evals.probes import write_modarith_probes
    from analysis.evals.tasks import DEFAULT_DATA_DIR
    from analysis.jobs.spec import DEFAULT_PROBES

    tasks = DEFAULT_DATA_DIR / "modarith"
    if not (tasks / "heldout.jsonl").is_file() or not (tasks / "train.jsonl").is_file():
        write_task_files(tasks, DEMO_RUNS["grokking"])
    if not (DEFAULT_PROBES / "heldout.jsonl").is_file():
        write_modarith_probes(DEFAULT_PROBES)


def cmd_demo(args: argparse.Namespace) -> int:
    """The demo: the shipped results (default), trained checkpoints (--train), or a full rebuild (--rebuild)."""
    store = Store(args.db)
    root = Path(args.root)
    if args.rebuild:
        return _demo_rebuild(store, root, args)
    if args.train:
        return _demo_train(store, root, args)
    from analysis.demo_data import SHIPPED_DIR, import_demo, missing_demo_runs

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
    _demo_data_files()
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
    seconds = rebuild(root, out, scale=args.scale, progress=_progress_bar("training"), unit_progress=_unit_bar)
    _demo_data_files()
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
    folders = build_demo(root, scale=args.scale, progress=_progress_bar("training"))
    _demo_data_files()
    known = set(store.runs().get("name", []))
    code = 0
    for folder in folders:
        if folder.name in retrained and folder.name in known:
            store.delete_run(folder.name)  # a retrained run is a new run: nothing of the old one applies
        code |= _register(store, load_run(folder))
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
        report = run_job(store, job_id, progress=_unit_bar())
        print(report.summary())
        for failure in report.failed or []:
            print(f"failed: {failure}", file=sys.stderr)
        code |= 1 if report.failed else 0
    return code


def cmd_add_run(args: argparse.Namespace) -> int:
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


def _print_frame(frame: pd.DataFrame, fmt: str) -> None:
    if fmt == "csv":
        frame.to_csv(sys.stdout, index=False)
    elif fmt == "json":
        # Through Python floats, not DataFrame.to_json, which rounds to 10 significant digits.
        records = frame.astype(object).where(frame.notna(), None).to_dict(orient="records")
        json.dump(records, sys.stdout, default=lambda v: v.item() if hasattr(v, "item") else str(v))
        print()
    else:
        print(frame.to_string(index=False) if len(frame) else "(no rows)")


def _analysis_frame(args: argparse.Namespace) -> pd.DataFrame:
    """The runs' long table with one setting per metric (``--setting METRIC=LABEL`` picks; default: most
    checkpoints)."""
    from analysis.settings import select_settings

    store = Store(args.db)
    known = set(store.runs().get("name", []))
    for run in args.run:
        if run not in known:
            hint = ", ".join(sorted(known)) or "none; add one with add-run or import-evals"
            raise ValueError(f"unknown run {run!r} in {args.db}; known runs: {hint}")
    chosen = {}
    for item in args.setting or []:
        metric, sep, label = item.rpartition("=")
        if not sep or not metric:
            raise ValueError(f"--setting {item!r}: write METRIC=SETTING, e.g. arc_easy/acc,none=5-shot")
        chosen[metric] = label
    return select_settings(store.long_table(args.run), chosen)


def _default_loss(frame: pd.DataFrame) -> str:
    from analysis.divergence import loss_metrics

    losses = loss_metrics(frame["metric"].astype(str).unique())
    if not losses:
        raise ValueError("these runs have no loss: give --loss METRIC, or evaluate heldout_loss first")
    return losses[0]


def cmd_windows(args: argparse.Namespace) -> int:
    from analysis.divergence import divergence_windows
    from analysis.samples import score_items

    frame = _analysis_frame(args)
    loss = args.loss or _default_loss(frame)
    items = score_items(Store(args.db), args.run, args.score, frame)  # the paired test where items exist
    windows = divergence_windows(
        frame, loss, args.score, loss_tol=args.tol, alpha=args.alpha, x=args.x, n_sim=args.n_sim, seed=args.seed,
        samples=items,
    )  # fmt: skip
    _print_frame(windows, args.format)
    return 0


def cmd_rank(args: argparse.Namespace) -> int:
    from analysis.divergence import predictor_ranking, ranking_verdict

    frame = _analysis_frame(args)
    loss = args.loss or _default_loss(frame)
    ranking = predictor_ranking(
        frame,
        args.score,
        candidates=args.candidates,
        loss_metric=loss,
        alpha=args.alpha,
        x=args.x,
        per_run=args.per_run,
    )
    _print_frame(ranking, args.format)
    if args.format == "table":
        print(ranking_verdict(ranking, loss))
    return 0


def cmd_forecast(args: argparse.Namespace) -> int:
    from analysis.forecast import forecast

    if len(args.run) > 1:
        raise ValueError("forecast takes one --run at a time; run it once per run")
    frame = _analysis_frame(args)
    if args.method == "two-step" and not args.via:
        args.via = args.loss or _default_loss(frame)
    rows, result = forecast(
        frame, args.run[0], args.score, method=args.method, x=args.x, fit_until=args.fit_until, at=args.at,
        via=args.via if args.method == "two-step" else None, level=args.level,
    )  # fmt: skip
    _print_frame(rows, args.format)
    if args.format == "table" and not result.converged:
        print("the fit did not converge: try another --method, or fit on more checkpoints (--fit-until)")
    return 0


def _unit_bar() -> Callable:
    """A progress(unit, n_units, name, done, total, what) callback drawing one tqdm bar over units."""
    from tqdm import tqdm

    state: dict = {}

    def update(unit: int, n_units: int, name: str, done: int, total: int, what: str) -> None:
        if "bar" not in state:
            state["bar"] = tqdm(total=n_units, desc="checkpoints", unit="ckpt", file=sys.stderr, dynamic_ncols=True)
        bar = state["bar"]
        bar.n = unit
        bar.set_postfix_str(f"step {name}: {what} ({done}/{total})")
        if unit >= n_units:
            bar.close()
            state.clear()

    return update


def _spec_from_args(args: argparse.Namespace):
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
    from analysis.jobs import run_job, submit

    store = Store(args.db)
    job_id = submit(store, _spec_from_args(args))
    if args.queue:
        print(f"queued job {job_id}; run `python -m analysis worker --db {args.db}` to execute it")
        return 0
    if args.executor == "ray":
        from analysis.jobs.ray_executor import run_job_ray

        report = run_job_ray(
            store, job_id, args.ray_address, args.ray_gpus_per_unit, split=args.ray_split, progress=_unit_bar()
        )
    else:
        report = run_job(store, job_id, progress=_unit_bar())
    print(report.summary())
    for failure in report.failed or []:
        print(f"failed: {failure}", file=sys.stderr)
    return 1 if report.failed and not report.computed and not report.cached else 0


def cmd_worker(args: argparse.Namespace) -> int:
    import logging

    from analysis.jobs import serve
    from analysis.logs import worker_log_path

    # Progress goes to the log (stderr and the worker's file, set up in main), not a progress bar.
    # Not __name__: under `python -m analysis` that is "__main__", outside the configured "analysis" loggers.
    log = logging.getLogger("analysis.__main__")
    log.info("worker log: %s (Ctrl-C to stop)", worker_log_path(args.db, os.getpid()))
    ran = serve(Store(args.db), poll=args.poll, once=args.once)
    print(f"ran {ran} job(s)")
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    jobs = Store(args.db).jobs()
    if not len(jobs):
        print("no jobs")
        return 0
    cols = ["id", "run", "status", "units_done", "units", "units_failed", "items_done", "items_total", "message"]
    print(jobs[cols].to_string(index=False))
    return 0


def cmd_import_evals(args: argparse.Namespace) -> int:
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
    from analysis.exchange import export_parquet

    manifest = export_parquet(Store(args.db), args.out, runs=args.run)
    counts = ", ".join(f"{table} {n}" for table, n in manifest["rows"].items())
    print(f"exported to {args.out}: {counts}")
    return 0


def cmd_import_cache(args: argparse.Namespace) -> int:
    from analysis.exchange import import_parquet

    print(import_parquet(Store(args.db), args.folder).summary())
    return 0


def cmd_metric(args: argparse.Namespace) -> int:
    from analysis.jobs.metric_once import compute_once, progress_printer

    result = compute_once(
        args.name, args.checkpoint, args.data, params=args.param or [], device=args.device, seed=args.seed,
        progress=progress_printer(args.name), dtype=args.dtype,
    )  # fmt: skip
    if args.format == "json":
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    version = Store(args.db).migrate()
    print(f"{args.db}: schema version {version}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from analysis.report import ReportOptions, build_report, export, format_of

    fmt = format_of(args.out, args.format)  # a bad suffix fails before any work
    options = ReportOptions(loss_metric=args.loss, downstream_metric=args.downstream, x=args.x, full=args.full)
    report = build_report(Store(args.db), args.run, options)
    done = export(report, args.out, fmt)
    for item in report.missing:
        print(
            f"missing: {item.what}" + (f" (compute it with `{item.command}`)" if item.command else ""), file=sys.stderr
        )
    for note in done.notes:
        print(f"note: {note}", file=sys.stderr)
    size = done.path.stat().st_size / 1e6
    print(f"wrote {done.path} ({done.format}, {len(report.figures)} figures, {size:.1f} MB)")
    return 0


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def build_parser() -> argparse.ArgumentParser:
    """The command line: one subcommand per task, each with the shared --db, --debug and --log-level flags."""
    parser = argparse.ArgumentParser(
        prog="python -m analysis",
        description="Where pretraining loss stops predicting downstream ability: cache, compute, report.",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--db", type=Path, default=DEFAULT_DB, help=f"cache file (default {DEFAULT_DB})")
    common.add_argument("--debug", action="store_true", help="on an error, print the full traceback before it")
    common.add_argument(
        "--log-level",
        default="info",
        help="debug, info (default), warning or error: what the job runner logs to stderr "
        "(a worker also to <db folder>/logs/<db name>-worker-<pid>.log)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # In the order `--help` lists the commands.
    _add_demo_command(sub, common)
    _add_run_commands(sub, common)
    _add_statistics_commands(sub, common)
    _add_compute_commands(sub, common)
    _add_transfer_commands(sub, common)
    _add_metric_command(sub, common)
    _add_report_command(sub, common)
    p = sub.add_parser("migrate", parents=[common], help="create or upgrade the cache schema")
    p.set_defaults(func=cmd_migrate)
    return parser


# The subparsers container: argparse names its type only privately.
_Commands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def _add_demo_command(sub: _Commands, common: argparse.ArgumentParser) -> None:
    """demo: the embedded demo's shipped results, its checkpoints, or a rebuild of both."""
    p = sub.add_parser(
        "demo", parents=[common], help="load the embedded demo's shipped results (--train: build its checkpoints too)"
    )
    p.add_argument("--root", default=str(DEMO_ROOT), help=f"where the demo checkpoints go (default {DEMO_ROOT})")
    p.add_argument("--train", action="store_true", help="train the demo runs and evaluate them here")
    p.add_argument(
        "--rebuild", action="store_true", help="retrain from scratch, recompute everything, rewrite the shipped results"
    )
    p.add_argument("--out", help="--rebuild: where the results go (default data/demo_results)")
    p.add_argument("--scale", type=float, default=1.0, help="--train, --rebuild: fraction of the steps (quick tries)")
    p.add_argument("--no-eval", action="store_true", help="--train: train and register only; queue no evaluation")
    p.add_argument("--wait", action="store_true", help="--train: run the demo evaluation here instead of queueing it")
    p.set_defaults(func=cmd_demo)


def _add_run_commands(sub: _Commands, common: argparse.ArgumentParser) -> None:
    """add-run, runs and query: registering runs and reading what the cache holds for them."""
    p = sub.add_parser("add-run", parents=[common], help="register a local checkpoint folder or hf://ORG/MODEL")
    p.add_argument("path", help="run folder (checkpoint-N/, step_N/, ...) or hf://ORG/MODEL")
    p.add_argument("--name", help="run name (default: the folder name)")
    p.add_argument("--log", help="training log: trainer_state.json, CSV, JSONL or a TensorBoard event file")
    p.add_argument(
        "--revisions",
        help="hf:// only: the revisions to register, without listing them online (step1000,step2000 or a file)",
    )
    p.add_argument(
        "--revision-filter",
        help="hf:// only: keep the revisions this glob ('step*000') or regex ('re:^step\\d+000$') matches",
    )
    p.add_argument("--step-map", help="CSV with columns revision (or checkpoint), step[, tokens]: the real steps")
    p.add_argument(
        "--steps-per-checkpoint", type=int, help="steps between ckpt_NNN checkpoints (LLM360): step = NNN * K"
    )
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


def _add_statistics_commands(sub: _Commands, common: argparse.ArgumentParser) -> None:
    """windows, rank and forecast: the divergence statistics, sharing their run, score and loss flags."""
    stats = argparse.ArgumentParser(add_help=False)
    stats.add_argument("--run", action="append", required=True, help="run name (repeat for several)")
    stats.add_argument("--score", required=True, help="downstream metric, e.g. arc_easy/acc,none")
    stats.add_argument("--loss", help="loss metric (default: eval/loss, then train/loss, then a held-out loss)")
    stats.add_argument("--x", choices=["step", "tokens"], default="step", help="x-axis to align on (default step)")
    stats.add_argument("--alpha", type=float, default=0.05, help="family-wise false-positive rate (default 0.05)")
    stats.add_argument("--setting", action="append", help="METRIC=SETTING to pick a setting (default: most points)")
    stats.add_argument("--format", choices=["table", "csv", "json"], default="table")

    p = sub.add_parser("windows", parents=[common, stats], help="divergence windows with adjusted p-values")
    p.add_argument("--tol", type=float, default=0.02, help="loss counts as flat within this fraction (default 0.02)")
    p.add_argument("--n-sim", type=int, default=2000, help="simulated null runs per run (default 2000)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_windows)

    p = sub.add_parser("rank", parents=[common, stats], help="rank signals by how well they predict a score")
    p.add_argument("--candidates", type=_split, help="signals to rank (default: every cached non-score metric)")
    p.add_argument("--per-run", action="store_true", help="also rank within each run")
    p.set_defaults(func=cmd_rank)

    p = sub.add_parser("forecast", parents=[common, stats], help="forecast a score at later checkpoints")
    p.add_argument("--method", choices=["power", "log", "two-step"], default="power", help="form (default power)")
    p.add_argument("--via", help="two-step: the loss or proxy metric (default: the run's loss)")
    p.add_argument("--fit-until", type=float, help="fit the checkpoints with x <= this (default: all)")
    p.add_argument("--at", type=float, action="append", help="x to predict at (repeat; default: the hidden ones)")
    p.add_argument("--level", type=float, default=0.9, help="prediction interval level (default 0.9)")
    p.set_defaults(func=cmd_forecast)


def _add_compute_commands(sub: _Commands, common: argparse.ArgumentParser) -> None:
    """eval, worker and jobs: computing what a run's checkpoints lack, here, queued or under Ray."""
    p = sub.add_parser("eval", parents=[common], help="compute what is missing for a run's checkpoints")
    p.add_argument("--run", required=True)
    p.add_argument("--steps", type=_split, help="checkpoint steps (default: all), e.g. 60,300")
    p.add_argument("--tasks", type=_split, help="lm-eval task names or task YAML paths, comma-separated")
    p.add_argument("--metrics", type=_split, help="heldout_loss, proxy, hessian_trace, ... comma-separated")
    p.add_argument("--data", help="probe data (JSONL/txt file or folder) for heldout_loss and internal metrics")
    p.add_argument("--limit", type=int, help="documents per task (default: all)")
    p.add_argument("--num-fewshot", type=int)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (cuda, mps, cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: chosen for the device")
    p.add_argument(
        "--param", action="append", help="METRIC.KEY=VALUE, e.g. hessian_trace.n_probes=16 or hessian_trace.seed=1"
    )
    p.add_argument("--keep", help="finetune: save each fine-tuned copy under this folder (default: keep none)")
    p.add_argument("--queue", action="store_true", help="only queue the job for `worker`")
    p.add_argument("--executor", choices=["local", "ray"], default="local", help="where units run (default local)")
    p.add_argument("--ray-address", help="Ray cluster address (default $RAY_ADDRESS, else a local Ray instance)")
    p.add_argument("--ray-gpus-per-unit", type=float, default=0, help="GPUs each Ray task reserves (default 0)")
    p.add_argument(
        "--ray-split",
        choices=["auto", "group", "checkpoint"],
        default="auto",
        help="one Ray task per metric group of a checkpoint, or per checkpoint (one load each); "
        "auto (default): by group while fewer checkpoints than worker slots need computing",
    )
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("worker", parents=[common], help="run queued jobs (the single writer)")
    p.add_argument("--poll", type=float, default=2.0, help="seconds between looks at the queue")
    p.add_argument("--once", action="store_true", help="exit when the queue is empty")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("jobs", parents=[common], help="list jobs and their progress")
    p.set_defaults(func=cmd_jobs)


def _add_transfer_commands(sub: _Commands, common: argparse.ArgumentParser) -> None:
    """import-evals, export and import-cache: lm-eval result files in, cache tables out and back in."""
    p = sub.add_parser("import-evals", parents=[common], help="import lm-eval result files into a run")
    p.add_argument("path", help="an lm-eval results JSON file or a folder of them")
    p.add_argument("--run", required=True)
    p.add_argument("--step", type=int, help="the checkpoint step when neither model_args nor the file name says")
    p.set_defaults(func=cmd_import_evals)

    p = sub.add_parser("export", parents=[common], help="write the cache's tables as Parquet for import-cache")
    p.add_argument("--out", required=True, help="folder for the Parquet files and manifest.json")
    p.add_argument("--run", action="append", help="only this run (repeat for several; default: all)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import-cache", parents=[common], help="merge a folder written by export into the cache")
    p.add_argument("folder", help="a folder written by `python -m analysis export`")
    p.set_defaults(func=cmd_import_cache)


def _add_metric_command(sub: _Commands, common: argparse.ArgumentParser) -> None:
    """metric: one metric on one checkpoint folder, printed, with nothing cached."""
    p = sub.add_parser("metric", parents=[common], help="compute one metric on one checkpoint, print it, cache nothing")
    p.add_argument("name", help="metric name (heldout_loss, hessian_trace, ...)")
    p.add_argument("--checkpoint", required=True, help="a transformers model folder")
    p.add_argument("--data", required=True, help="probe data: JSONL with text or input_ids")
    p.add_argument("--param", action="append", help="KEY=VALUE (repeat); seed=N seeds this metric's draws")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: chosen for the device")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--format", choices=["json", "text"], default="json")
    p.set_defaults(func=cmd_metric)


def _add_report_command(sub: _Commands, common: argparse.ArgumentParser) -> None:
    """report: the exported report of one or more runs."""
    p = sub.add_parser("report", parents=[common], help="export a report: HTML, PDF, Markdown, CSV or Parquet")
    p.add_argument(
        "--run", action="append", required=True, help="run name (repeat for several; the first is the reference)"
    )
    p.add_argument("--out", required=True, help="output file: .html, .pdf, .md, .zip, .csv or .parquet")
    p.add_argument("--format", choices=["html", "pdf", "md", "zip", "csv", "parquet"], help="default: from --out")
    p.add_argument("--loss", help="loss metric (default: as the Divergence page, eval/loss then train/loss)")
    p.add_argument("--downstream", help="downstream metric (default: the first lm-eval score)")
    p.add_argument("--x", choices=["step", "tokens"], default="step", help="x-axis (default step)")
    p.add_argument(
        "--full", action="store_true", help="every table in full and a page per section (default: about 20 pages)"
    )
    p.set_defaults(func=cmd_report)


def main(argv: list[str] | None = None) -> int:
    """Run one command; every failure ends in one ``error:`` line and exit 2 (``--debug``: the traceback first)."""
    import traceback

    from tqdm.contrib.logging import logging_redirect_tqdm

    from analysis.logs import configured, worker_log_path

    args = build_parser().parse_args(argv)
    try:
        # Logging is configured here once per command; a worker also keeps a log file beside the cache.
        log_file = worker_log_path(args.db, os.getpid()) if args.command == "worker" else None
        # Log lines on stderr print above a command's progress bar instead of through it.
        with configured(args.log_level, log_file) as log, logging_redirect_tqdm(loggers=[log]):
            return args.func(args)
    except (ValueError, KeyError, FileNotFoundError, StoreLockedError) as err:
        if args.debug:
            traceback.print_exc()
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished units are kept in the cache", file=sys.stderr)
        return 130
    except Exception as err:  # the command line's boundary: nothing unexpected ends in a traceback
        if args.debug:
            traceback.print_exc()
        # One line: the command, what it worked on, what failed, and what to do.
        what = args.command + (f" {args.name}" if args.command == "metric" else "")
        inputs = [(key, getattr(args, key, None)) for key in ("checkpoint", "data", "path", "folder", "run", "out")]
        named = ", ".join(f"{key} {', '.join(map(str, v)) if isinstance(v, list) else v}" for key, v in inputs if v)
        text = str(err).strip()
        reason = f"{type(err).__name__}: {text.splitlines()[0][:300]}" if text else type(err).__name__
        hint = "rerun with --debug for the traceback"
        if args.command == "metric":
            hint = (
                "the model failed on the probe data: check that config.json matches the weights (hidden_size "
                "divisible by num_attention_heads, vocab_size above every probe token id), or re-save the "
                f"checkpoint with save_pretrained; {hint}"
            )
        where = f" ({named})" if named else ""
        print(f"error: {what} failed{where}: {reason}; {hint}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
