"""The command line: ``python -m analysis <command> [--db PATH] ...``.

Bad input ends with one line on stderr that names the file and the fix, and a non-zero
exit code; never a traceback.

This module assembles the parser and runs a command; the commands live in :mod:`analysis.cli`, one
module per concept (runs, demo, statistics, jobs, exchange, metric, report).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TypeAlias

from analysis.cli.common import comma_list
from analysis.cli.demo import DEMO_ROOT, cmd_demo
from analysis.cli.exchange import cmd_export, cmd_import_cache, cmd_import_evals
from analysis.cli.jobs import cmd_eval, cmd_jobs, cmd_worker
from analysis.cli.metric import cmd_metric
from analysis.cli.report import cmd_report
from analysis.cli.runs import cmd_add_run, cmd_migrate, cmd_query, cmd_runs
from analysis.cli.statistics import cmd_forecast, cmd_rank, cmd_windows
from analysis.store import DEFAULT_DB, StoreLockedError


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
    p.add_argument(
        "--no-finetune", action="store_true", help="--rebuild: leave out the fine-tune probe (the longest part)"
    )
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
    p.add_argument("--metric", type=comma_list, help="only these metrics (comma-separated)")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")
    p.set_defaults(func=cmd_query)


def _add_statistics_commands(sub: _Commands, common: argparse.ArgumentParser) -> None:
    """windows, rank and forecast: the divergence statistics, sharing their run, score and loss flags."""
    stats = argparse.ArgumentParser(add_help=False)
    stats.add_argument("--run", action="append", required=True, help="run name (repeat for several)")
    stats.add_argument("--score", required=True, help="downstream metric, e.g. arc_easy/acc,none")
    stats.add_argument("--loss", help="loss metric (default: train/loss, then eval/loss, then a held-out loss)")
    stats.add_argument("--x", choices=["step", "tokens"], default="step", help="x-axis to align on (default step)")
    stats.add_argument("--alpha", type=float, default=0.05, help="family-wise false-positive rate (default 0.05)")
    stats.add_argument("--setting", action="append", help="METRIC=SETTING to pick a setting (default: most points)")
    stats.add_argument("--format", choices=["table", "csv", "json"], default="table")

    p = sub.add_parser("windows", parents=[common, stats], help="divergence windows with adjusted p-values")
    p.add_argument("--tol", type=float, default=0.02, help="loss counts as flat within this fraction (default 0.02)")
    p.add_argument(
        "--flat-of", choices=["range", "value", "absolute"], default="range",
        help="--tol is a fraction of the run's loss range (default, as the Divergence page), of the loss's value, "
        "or an absolute amount",
    )  # fmt: skip
    p.add_argument("--n-sim", type=int, default=2000, help="simulated null runs per run (default 2000)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_windows)

    p = sub.add_parser("rank", parents=[common, stats], help="rank signals by how well they predict a score")
    p.add_argument("--candidates", type=comma_list, help="signals to rank (default: every cached non-score metric)")
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
    p.add_argument("--steps", type=comma_list, help="checkpoint steps (default: all), e.g. 60,300")
    p.add_argument("--tasks", type=comma_list, help="lm-eval task names or task YAML paths, comma-separated")
    p.add_argument("--metrics", type=comma_list, help="heldout_loss, proxy, hessian_trace, ... comma-separated")
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
    p.add_argument("--loss", help="loss metric (default: as the Divergence page, train/loss then eval/loss)")
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
