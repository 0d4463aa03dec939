"""Which way is better: declared by the producer, then registered, then read from the name."""

from __future__ import annotations

import pandas as pd
import pytest

from analysis.directions import higher_is_better


@pytest.mark.parametrize(
    ("metric", "better_up"),
    [
        ("arc_easy/acc,none", True),
        ("arc_easy/acc_norm,none", True),
        ("gsm8k/exact_match,strict-match", True),
        ("lambada_openai/ppl,none", False),
        ("wikitext/word_perplexity,none", False),
        ("wikitext/bits_per_byte,none", False),
        ("crows_pairs_english/pct_stereotype,none", False),
        ("crows_pairs_english/likelihood_difference,none", False),
        ("train/loss", False),
        ("eval/accuracy", True),
        ("web/heldout_bpb", False),
        ("proxy_expert_rank", False),
        ("proxy_reciprocal_rank", True),
        ("modarith_mc/p_correct,none", True),
        ("modarith_mc/nll_per_token,none", False),
        ("modarith_mc/margin,none", True),
    ],
)
def test_direction_from_the_name_and_the_registry(metric, better_up):
    assert higher_is_better(metric) is better_up


def test_a_declared_direction_wins_over_the_name():
    frame = pd.DataFrame({"metric": ["t/acc,none", "t/acc,none"], "higher_is_better": [False, False]})
    assert higher_is_better("t/acc,none", frame) is False
    assert higher_is_better("t/acc,none", frame.assign(higher_is_better=None)) is True
