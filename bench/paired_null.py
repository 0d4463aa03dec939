"""False-window rate of the paired span test on pure noise, the covariance taken as exact against the
multivariate-t null the project uses, over item counts and checkpoint counts.

Items keep a difficulty (Beta(0.6, 0.6)); each checkpoint redraws an item's right/wrong with probability 0.5
and keeps the previous one otherwise, so the score's mean never moves. Every span is a candidate. Prints the
share of runs with any window at alpha 0.05 for each arm, the same simulated data for both.

    python -m bench.paired_null [--reps 300]
"""

from __future__ import annotations

import argparse

import numpy as np

from analysis import significance as sig


def null_runs(
    n_items: int, n_ck: int, reps: int, rng: np.random.Generator, arms: tuple[str, ...] = ("normal", "t")
) -> dict[str, float]:
    """Share of null runs with any window, per arm: covariance as exact ("normal"), multivariate t ("t")."""
    i, j = np.triu_indices(n_ck, k=1)
    hits = dict.fromkeys(arms, 0)
    for r in range(reps):
        p = rng.beta(0.6, 0.6, n_items)
        x = np.empty((n_items, n_ck))
        x[:, 0] = rng.random(n_items) < p
        for t in range(1, n_ck):
            x[:, t] = np.where(rng.random(n_items) >= 0.5, rng.random(n_items) < p, x[:, t - 1])
        cov = sig.paired_covariance(x)
        for arm in arms:
            items = n_items if arm == "t" else None
            test = sig.span_test(x.mean(0), np.full(n_ck, np.nan), i, j, np.ones(len(i)), cov=cov, items=items,
                                 n_sim=1000, seed=r)  # fmt: skip
            hits[arm] += bool(test is not None and (test.p_adjusted <= 0.05).any())
    return {arm: h / reps for arm, h in hits.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=300)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(11)
    print(f"share of null runs with any window at alpha 0.05 ({args.reps} runs a cell)")
    for n_items in (30, 100, 400):
        for n_ck in (5, 34, 100):
            rates = null_runs(n_items, n_ck, args.reps, rng)
            print(
                f"  {n_items} items x {n_ck} checkpoints: covariance as exact {rates['normal']:.3f}, t {rates['t']:.3f}"
            )


if __name__ == "__main__":
    main()
