"""Catastrophic-overtraining windows tested like code: null simulations at the stated rate, planted falls found."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analysis.finetune.windows import finetune_tasks, overtraining_spans, overtraining_windows

ALPHA = 0.05
SE = 0.02


def _any_window(n: int, rng: np.random.Generator, *, fall: float = 0.0, pre_trend: float = 0.3) -> list[dict]:
    """One simulated run: the pre score rises by ``pre_trend`` over the run (plus noise); the post score is
    flat plus noise, with a fall of ``fall`` stderrs from the middle checkpoint on."""
    pre = np.linspace(0.2, 0.2 + pre_trend, n) + SE * rng.standard_normal(n)
    post = 0.6 + SE * rng.standard_normal(n)
    post[n // 2 :] -= fall * SE
    found, _ = overtraining_spans(
        pre, np.full(n, SE), post, np.full(n, SE), alpha=ALPHA, n_sim=400, seed=int(rng.integers(1 << 30))
    )
    return found


@pytest.mark.parametrize(("n", "runs"), [(5, 400), (20, 400), (100, 200)])
@pytest.mark.slow
def test_no_real_fall_gives_a_window_at_rate_alpha(n: int, runs: int) -> None:
    rng = np.random.default_rng(n)
    rate = np.mean([bool(_any_window(n, rng)) for _ in range(runs)])
    # Monte-Carlo error of a rate near 0.05: 0.011 at 400 runs, 0.015 at 200; allow 3 of them, plus the
    # simulated null's own resolution (400 draws).
    assert abs(rate - ALPHA) < 3 * np.sqrt(ALPHA * (1 - ALPHA) / runs) + 0.01, rate


def test_a_post_fall_without_a_pre_rise_is_no_window() -> None:
    # The post score falls by 20 stderrs, but the pre score is flat: not overtraining, no candidate span.
    post = np.r_[np.full(10, 0.8), np.full(10, 0.8 - 20 * SE)]
    found, source = overtraining_spans(np.full(20, 0.5), np.full(20, SE), post, np.full(20, SE), n_sim=200)
    assert found == [] and source == "none"
    # The same fall while the pre score rises by 3 stderrs per checkpoint: found.
    found, _ = overtraining_spans(0.5 + 3 * SE * np.arange(20), np.full(20, SE), post, np.full(20, SE), n_sim=200)
    assert len(found) == 1 and found[0]["start"] < 10 <= found[0]["end"]


@pytest.mark.parametrize("n", [5, 20, 100])
def test_a_planted_fall_of_eight_stderrs_is_found_where_it_is(n: int) -> None:
    rng = np.random.default_rng(1)
    hits = 0
    for _ in range(40):
        found = _any_window(n, rng, fall=8.0)
        # A window must straddle the fall (start before the middle checkpoint, end at or after it).
        hits += any(w["start"] < n // 2 <= w["end"] and w["post_change"] < 0 for w in found)
    assert hits >= 36, hits


def test_windows_of_a_long_table_follow_the_score_direction() -> None:
    steps = np.arange(1, 21) * 10
    rows = []
    rng = np.random.default_rng(3)
    for run, fall in (("over", 0.3), ("fine", 0.0)):
        pre = np.linspace(0.2, 0.8, 20)
        post = 0.9 - fall * (steps >= 120) + 0.005 * rng.standard_normal(20)
        for s, a, b in zip(steps, pre, post, strict=True):
            rows.append({"run": run, "step": s, "metric": "finetune/t/pre", "value": a, "stderr": 0.02})
            rows.append({"run": run, "step": s, "metric": "finetune/t/post", "value": b, "stderr": 0.02})
    frame = pd.DataFrame(rows)
    windows = overtraining_windows(frame, "t", n_sim=500)
    assert list(windows["run"]) == ["over"]
    w = windows.iloc[0]
    assert w["start"] < 120 <= w["end"] and w["post_change"] < 0 and w["p_adjusted"] <= ALPHA
    assert w["change_hi"] < 0  # the simultaneous interval excludes no fall
    assert finetune_tasks(list(frame["metric"])) == ["t"]
    # A perplexity-like score (lower is better, declared): a rising post value is the worsening.
    flipped = frame.assign(value=-frame["value"], higher_is_better=False)
    again = overtraining_windows(flipped, "t", n_sim=500)
    assert list(again["run"]) == ["over"] and again.iloc[0]["post_change"] > 0


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="alpha"):
        overtraining_windows(pd.DataFrame(columns=["run", "step", "metric", "value", "stderr"]), "t", alpha=1.5)
    with pytest.raises(ValueError, match="min_points"):
        overtraining_windows(pd.DataFrame(columns=["run", "step", "metric", "value", "stderr"]), "t", min_points=1)
