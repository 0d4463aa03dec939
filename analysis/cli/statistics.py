"""The ``windows``, ``rank`` and ``forecast`` commands: the divergence statistics over cached runs."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from analysis.cli.common import print_frame
from analysis.store import Store

if TYPE_CHECKING:
    import pandas as pd


def analysis_frame(args: argparse.Namespace) -> pd.DataFrame:
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


def default_loss(frame: pd.DataFrame) -> str:
    """The first of the frame's loss metrics, in ``loss_metrics`` order; ValueError when it has none."""
    from analysis.divergence import loss_metrics

    losses = loss_metrics(frame["metric"].astype(str).unique())
    if not losses:
        raise ValueError("these runs have no loss: give --loss METRIC, or evaluate heldout_loss first")
    return losses[0]


def cmd_windows(args: argparse.Namespace) -> int:
    """windows: the divergence windows of the runs, with adjusted p-values."""
    from analysis.divergence import divergence_windows
    from analysis.samples import score_items

    frame = analysis_frame(args)
    loss = args.loss or default_loss(frame)
    items = score_items(Store(args.db), args.run, args.score, frame)  # the paired test where items exist
    windows = divergence_windows(
        frame, loss, args.score, loss_tol=args.tol, tol_of=args.flat_of, alpha=args.alpha, x=args.x,
        n_sim=args.n_sim, seed=args.seed, samples=items,
    )  # fmt: skip
    print_frame(windows, args.format)
    return 0


def cmd_rank(args: argparse.Namespace) -> int:
    """rank: the signals ranked by how well they predict the score (and a verdict under the table)."""
    from analysis.divergence import predictor_ranking, ranking_verdict

    frame = analysis_frame(args)
    loss = args.loss or default_loss(frame)
    ranking = predictor_ranking(
        frame,
        args.score,
        candidates=args.candidates,
        loss_metric=loss,
        alpha=args.alpha,
        x=args.x,
        per_run=args.per_run,
    )
    print_frame(ranking, args.format)
    if args.format == "table":
        print(ranking_verdict(ranking, loss))
    return 0


def cmd_forecast(args: argparse.Namespace) -> int:
    """forecast: fit one run's early checkpoints and predict the score later, with intervals."""
    from analysis.forecast import forecast

    if len(args.run) > 1:
        raise ValueError("forecast takes one --run at a time; run it once per run")
    frame = analysis_frame(args)
    if args.method == "two-step" and not args.via:
        args.via = args.loss or default_loss(frame)
    rows, result = forecast(
        frame, args.run[0], args.score, method=args.method, x=args.x, fit_until=args.fit_until, at=args.at,
        via=args.via if args.method == "two-step" else None, level=args.level,
    )  # fmt: skip
    print_frame(rows, args.format)
    if args.format == "table" and not result.converged:
        print("the fit did not converge: try another --method, or fit on more checkpoints (--fit-until)")
    return 0
