"""False-positive rate and power of everything the dashboard calls significant, by simulation.

Each row runs the project's procedure and, beside it, the baseline it replaced, on the same simulated runs
whose truth is set here:

- **windows, null** (flat loss, a score that is constant plus Gaussian noise of its reported stderr 0.02):
  the share of runs with any grokking window. Project: ``divergence_windows`` (max-T over every span,
  alpha 0.05). Baseline: the former rule, any span whose endpoint change exceeds z = 3 combined stderrs.
- **windows, null, no stderr**: the same with the stderr not reported (the project estimates it).
- **windows, power**: a rise of 8 stderrs over 3 checkpoints at 60% of a flat-loss run; the share of runs
  with a grokking window around it.
- **change correlation, null**: a random-walk score unrelated to a falling loss; the share of runs whose
  95% interval excludes 0. Project: Spearman of changes with the effective-n Fisher interval.
  Baseline: a percentile bootstrap of the levels' Spearman (checkpoints resampled as if independent).
- **beats the loss, null**: 10 candidates with the same noise around the score as the loss; the share of
  runs in which any candidate "beats" the loss. Project: ``predictor_ranking(...).beats_loss``. Baseline:
  "a candidate's leave-one-out RMSE is below the loss's", the comparison the ranking used to invite.

The coverage of the estimators' standard errors is ``python -m bench.coverage``.

    python -m bench.calibration [--reps 200] [--sizes 5,10,20,50,150,300] [--seed 0]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
from scipy import stats

from analysis import significance as sig
from analysis.divergence import divergence_windows, predictor_ranking

LOSS, SCORE = "train/loss", "task/acc,none"


def _frame(loss: np.ndarray, score: np.ndarray, stderr: float | None, extra: dict | None = None) -> pd.DataFrame:
    n = len(score)
    steps = np.arange(1, n + 1) * 100
    parts = {LOSS: (loss, np.nan), SCORE: (score, np.nan if stderr is None else stderr), **(extra or {})}
    frames = [
        pd.DataFrame({"run": "r", "step": steps, "metric": m, "value": v, "stderr": se}) for m, (v, se) in parts.items()
    ]
    frame = pd.concat(frames, ignore_index=True)
    return frame.assign(tokens=frame["step"] * 1000)


def _old_windows(score: np.ndarray, stderr: float, z: float = 3.0) -> bool:
    """The former rule on a flat loss: any pair i < j with score_j - score_i > z * sqrt(2) * stderr."""
    running_min = np.minimum.accumulate(score)
    return bool((score[1:] - running_min[:-1] > z * np.sqrt(2) * stderr).any())


def windows_rows(sizes: list[int], reps: int, rng: np.random.Generator) -> list[tuple]:
    rows = []
    for n in sizes:
        fp = fp_old = fp_est = power = 0
        n_sim = 1000 if n <= 150 else 400
        for r in range(reps):
            flat = np.full(n, 2.0)
            noise = 0.5 + 0.02 * rng.standard_normal(n)
            fp += len(divergence_windows(_frame(flat, noise, 0.02), LOSS, SCORE, n_sim=n_sim, seed=r)) > 0
            fp_old += _old_windows(noise, 0.02)
            fp_est += len(divergence_windows(_frame(flat, noise, None), LOSS, SCORE, n_sim=n_sim, seed=r)) > 0
            at = int(0.6 * n)
            mean = np.where(np.arange(n) < at, 0.3, 0.46)
            mean[min(at, n - 1)] = 0.38
            planted = mean + 0.02 * rng.standard_normal(n)
            found = divergence_windows(_frame(flat, planted, 0.02), LOSS, SCORE, n_sim=n_sim, seed=r)
            lo, hi = 100 * at, 100 * (at + 2)  # steps of the checkpoints around the move
            power += bool(((found["start"] <= hi) & (found["end"] >= lo)).any())
        rows.append(("windows, null", n, fp / reps, fp_old / reps))
        rows.append(("windows, null, no stderr", n, fp_est / reps, float("nan")))
        rows.append(("windows, power (8 se rise)", n, power / reps, float("nan")))
    return rows


def _bootstrap_excludes_zero(a: np.ndarray, b: np.ndarray, rng: np.random.Generator, n_boot: int = 300) -> bool:
    idx = rng.integers(0, len(a), size=(n_boot, len(a)))
    rhos = np.array([stats.spearmanr(a[i], b[i]).statistic for i in idx])
    lo, hi = np.nanpercentile(rhos, [2.5, 97.5])
    return not lo <= 0 <= hi


def correlation_rows(sizes: list[int], reps: int, rng: np.random.Generator) -> list[tuple]:
    rows = []
    for n in sizes:
        ours = base = 0
        for _ in range(reps):
            loss = 4.0 * np.arange(1, n + 1) ** -0.3 + 0.005 * rng.standard_normal(n)
            score = 0.5 + np.cumsum(0.01 * rng.standard_normal(n)) + 0.005 * rng.standard_normal(n)
            change = sig.change_correlation(loss, score)
            ours += not change.lo <= 0 <= change.hi
            base += _bootstrap_excludes_zero(loss, score, rng)
        rows.append(("change correlation, null", n, ours / reps, base / reps))
    return rows


def ranking_rows(sizes: list[int], reps: int, rng: np.random.Generator) -> list[tuple]:
    rows = []
    for n in sizes:
        ours = base = 0
        k = 10 if n <= 50 else 3
        for _ in range(reps):
            score = 1 / (1 + np.exp(-np.linspace(-3, 3, n))) + 0.01 * rng.standard_normal(n)
            extra = {f"signal_{c}": (score + 0.1 * rng.standard_normal(n), np.nan) for c in range(k)}
            frame = _frame(-score + 0.1 * rng.standard_normal(n), score, 0.01, extra)
            out = predictor_ranking(frame, SCORE, loss_metric=LOSS, n_sim=1000)
            ours += bool(out["beats_loss"].any())
            loss_rmse = float(out.loc[out["is_loss"], "loo_rmse"].iloc[0])
            base += bool((out.loc[~out["is_loss"], "loo_rmse"] < loss_rmse).any())
        rows.append((f"beats the loss, null ({k} candidates)", n, ours / reps, base / reps))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--sizes", default="5,10,20,50,150,300")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    rng = np.random.default_rng(args.seed)
    start = time.perf_counter()
    rows = windows_rows(sizes, args.reps, rng)
    rows += correlation_rows(sorted({max(n, 10) for n in sizes}), args.reps, rng)
    rows += ranking_rows(sorted({max(n, 6) for n in sizes if n <= 150}), max(20, args.reps // 4), rng)
    mc = 1.96 * np.sqrt(0.05 * 0.95 / args.reps)
    print(f"calibration: {args.reps} simulated runs per cell (windows, correlations), alpha = 0.05 (+-{mc:.3f} MC)")
    print(f"{'procedure':40s} {'n':>5s} {'project':>8s} {'baseline':>9s}")
    for name, n, ours, base in rows:
        base_text = "" if np.isnan(base) else f"{base:9.3f}"
        print(f"{name:40s} {n:5d} {ours:8.3f} {base_text}")
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
