"""Backtest of the forecasts on Pythia's published evaluations: hide the end of each run, forecast it.

For Pythia 70M and 1.4B (tests/fixtures/pythia: 27 checkpoints each, zero-shot, eight tasks), every form is
fitted on the checkpoints up to step 33,000 (x = tokens, 2,097,152 per step) and asked for step 143,000;
the table gives, per form and task, the absolute error there and whether the 90% interval covered the
measured score, and a summary per form. The baseline is the last fitted checkpoint carried forward (the
"no change" forecast): a form that cannot beat it has learnt nothing about the curve.

    python -m bench.forecast [--fit-until 33000] [--at 143000]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.evals.lmeval import parse_results_file
from analysis.forecast import forecast

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "pythia"
TOKENS_PER_STEP = 2_097_152  # Pythia: 1,024 sequences of 2,048 tokens per step
TASKS = [
    "arc_easy/acc,none", "arc_challenge/acc,none", "lambada_openai/acc,none", "piqa/acc,none",
    "sciq/acc,none", "winogrande/acc,none", "logiqa/acc,none", "wsc/acc,none",
]  # fmt: skip
FORMS = [("power", None), ("log", None), ("two-step", "lambada_openai/ppl,none")]


def pythia_frame(sizes: tuple[str, ...] = ("70m", "1.4b")) -> pd.DataFrame:
    """The fixtures as one long table: run (the size), step, tokens, metric, value, stderr."""
    rows = []
    for size in sizes:
        for path in sorted((FIXTURES / size).glob("*.json")):
            imported = parse_results_file(path)
            for r in imported.rows:
                value = (
                    size,
                    imported.step,
                    imported.step * TOKENS_PER_STEP,
                    f"{r.task}/{r.metric}",
                    r.value,
                    r.stderr,
                )
                rows.append(value)
    return pd.DataFrame(rows, columns=["run", "step", "tokens", "metric", "value", "stderr"])


def backtest_table(frame: pd.DataFrame, fit_until_step: int = 33_000, at_step: int = 143_000) -> pd.DataFrame:
    """One row per (run, task, form): measured, predicted, interval, covered, absolute error, and the
    last-fitted-checkpoint baseline's error."""
    out = []
    for run in sorted(frame["run"].unique()):
        for task in TASKS:
            series = frame[(frame["run"] == run) & (frame["metric"] == task)].sort_values("step")
            last_fitted = float(series.loc[series["step"] <= fit_until_step, "value"].iloc[-1])
            for method, via in FORMS:
                rows, _ = forecast(
                    frame, run, task, method=method, via=via, x="tokens",
                    fit_until=fit_until_step * TOKENS_PER_STEP, at=[at_step * TOKENS_PER_STEP],
                )  # fmt: skip
                row = rows.iloc[0]
                out.append(
                    {
                        "run": run,
                        "task": task,
                        "form": row["method"],
                        "measured": row["measured"],
                        "predicted": row["predicted"],
                        "lo": row["lo"],
                        "hi": row["hi"],
                        "covered": bool(row["covered"]),
                        "abs_error": row["abs_error"],
                        "baseline_error": abs(last_fitted - row["measured"]),
                    }
                )
    return pd.DataFrame(out)


def summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per form: coverage of the 90% intervals, median absolute error, and the baseline's median error."""
    return table.groupby("form", sort=False).agg(
        coverage=("covered", "mean"),
        median_abs_error=("abs_error", "median"),
        baseline_median_abs_error=("baseline_error", "median"),
        n=("covered", "size"),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--fit-until", type=int, default=33_000, help="last step fitted (default 33000)")
    parser.add_argument("--at", type=int, default=143_000, help="step forecast (default 143000)")
    args = parser.parse_args(argv)
    table = backtest_table(pythia_frame(), args.fit_until, args.at)
    with pd.option_context("display.width", 160, "display.max_rows", 200):
        print(table.round(3).to_string(index=False))
        print()
        print(summary(table).round(3).to_string())
    print(f"(90% intervals; fitted on steps <= {args.fit_until}, forecast at step {args.at}; "
          f"{np.isfinite(table['abs_error']).sum()} forecasts)")  # fmt: skip


if __name__ == "__main__":
    main()
