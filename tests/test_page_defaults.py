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
