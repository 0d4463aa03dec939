"""What the signal pages open on: the separating signal when the ranking says one beats the loss, else a plain no."""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.divergence import POOLED, accuracy_first, predictor_ranking
from analysis.divergence.defaults import separating_signal

FAMILY = ("hessian_trace", "fisher_trace", "sam_sharpness")


def _frame(rng: np.random.Generator, planted: bool) -> pd.DataFrame:
    """Two runs, 12 checkpoints each; accuracy differs by run; fisher_trace tracks it when ``planted``."""
    rows = []
    for run, level in (("a", 0.2), ("b", 0.8)):
        for step in range(100, 1300, 100):
            acc = level * step / 1200 + 0.02 * rng.standard_normal()
            values = {
                "train/loss": 1.0 + 0.01 * rng.standard_normal(),  # the same loss for both runs
                "task/acc,none": acc,
                "hessian_trace": rng.standard_normal(),
                "fisher_trace": (3 * acc if planted else 0) + 0.05 * rng.standard_normal(),
                "sam_sharpness": rng.standard_normal(),
            }
            rows += [{"run": run, "step": step, "metric": m, "value": v, "stderr": np.nan} for m, v in values.items()]
    return pd.DataFrame(rows)


def test_opens_on_the_signal_that_beats_the_loss():
    frame = _frame(np.random.default_rng(0), planted=True)
    ranking = predictor_ranking(frame, "task/acc,none", loss_metric="train/loss", n_sim=1000)
    best, sentence = separating_signal(ranking, FAMILY, "task/acc,none", "flatness metrics")
    assert best == "fisher_trace"
    assert sentence.startswith("Opens on fisher_trace") and "adjusted p" in sentence and "R²" in sentence


def test_says_so_when_no_signal_separates_the_runs():
    frame = _frame(np.random.default_rng(1), planted=False)
    ranking = predictor_ranking(frame, "task/acc,none", loss_metric="train/loss", n_sim=1000)
    best, sentence = separating_signal(ranking, FAMILY, "task/acc,none", "flatness metrics")
    assert best is None and sentence.startswith("None of the flatness metrics")


def test_empty_or_unranked_input_gives_a_sentence_not_an_error():
    empty = pd.DataFrame(columns=["run", "predictor", "loo_r2", "n", "beats_loss", "beats_loss_p"])
    assert separating_signal(empty, FAMILY, "s", "routing metrics")[0] is None
    other = pd.DataFrame([{"run": POOLED, "predictor": "x", "loo_r2": 0.9, "n": 9, "beats_loss": True}])
    best, sentence = separating_signal(other, FAMILY, "s", "routing metrics")
    assert best is None and "could be ranked" in sentence


def test_accuracy_first_keeps_every_score_once_in_front():
    scores = ["t/exact_match,none", "t/acc_norm,none", "t/acc,none", "eval/accuracy"]
    order = accuracy_first(scores)
    assert order[:2] == ["t/acc,none", "eval/accuracy"] and set(order) == set(scores)
    tuned = accuracy_first(["finetune/m/change:t/acc,none", "t/acc,none"])
    assert tuned[0] == "t/acc,none" and set(tuned) == {"finetune/m/change:t/acc,none", "t/acc,none"}


def test_a_signal_that_only_tells_the_runs_apart_is_not_said_to_follow_the_score():
    """Two runs at the same loss with different scores: pooled, a signal that separates them beats the loss;
    within each run, where the loss follows the score, it must not be credited with following it too."""
    from analysis.divergence import within_runs

    rng = np.random.default_rng(3)
    rows = []
    steps = np.arange(100, 3100, 100)
    for run, level in (("a", 0.3), ("b", 0.9)):
        trend = np.log(steps / 50)  # the same shape of training in both runs
        values = {
            "train/loss": 4.0 - trend,  # the same loss in both runs, following the score within each
            "task/acc,none": level * trend / trend.max() + 0.01 * rng.standard_normal(len(steps)),
            "sam_sharpness": level * (trend / trend.max() + 0.3 * rng.standard_normal(len(steps))),  # noisy
            "fisher_trace": level * trend / trend.max() + 0.001 * rng.standard_normal(len(steps)),  # tracks it
        }
        for m, v in values.items():
            pairs = zip(steps, v, strict=True)
            rows += [{"run": run, "step": s, "metric": m, "value": x, "stderr": np.nan} for s, x in pairs]
    frame = pd.DataFrame(rows)
    ranking = predictor_ranking(frame, "task/acc,none", loss_metric="train/loss", n_sim=1000)
    pooled = ranking[ranking["run"] == POOLED].set_index("predictor")
    assert pooled.loc["sam_sharpness", "beats_loss"], "it separates the runs, so it beats the loss pooled"

    def within(signal: str) -> dict[str, float]:
        return within_runs(frame, signal, "task/acc,none", "train/loss", n_sim=1000)

    best, sentence = separating_signal(ranking, ("sam_sharpness",), "acc", "flatness metrics", within)
    assert best == "sam_sharpness" and "does not beat the loss" in sentence and "not shown to" in sentence, sentence
    best, sentence = separating_signal(ranking, ("fisher_trace",), "acc", "flatness metrics", within)
    assert best == "fisher_trace" and "separates the runs" in sentence, sentence
    assert within("sam_sharpness").keys() == {"a", "b"}


def test_the_within_run_sentence_says_which_runs_it_follows_the_score_in_holm_adjusted():
    ranking = pd.DataFrame(
        [{"run": POOLED, "predictor": "x", "loo_r2": 0.9, "n": 40, "beats_loss": True, "beats_loss_p": 0.001}]
    )
    _, both = separating_signal(ranking, ("x",), "acc", "m", lambda s: {"a": 0.001, "b": 0.02})
    assert "Within each run it beats the loss too (a p = 0.002, b p = 0.02)" in both
    _, one = separating_signal(ranking, ("x",), "acc", "m", lambda s: {"a": 0.001, "b": 0.4})
    assert "only in a" in one
    _, alone = separating_signal(ranking, ("x",), "acc", "m")
    assert alone.endswith("separates the runs as acc does.")
