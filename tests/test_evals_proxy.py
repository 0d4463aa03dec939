"""Proxy metrics against a hand computation on hand-set logits."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from analysis.evals.proxy import STATISTICS, proxy_metrics
from analysis.models import build_word_tokenizer

# Vocabulary: <pad>=0 <bos>=1 <eos>=2 <unk>=3 a=4 b=5 c=6 d=7 e=8 f=9.
WORDS = ["a", "b", "c", "d", "e", "f"]
V = 10
# Logits by position; "a b" + "c d e" is [bos a b c d e], so positions 2, 3, 4 predict c, d, e.
LOGITS = {
    2: [0.0, 0.0, 0.0, 0.0, 0.5, 1.0, 3.0, 2.0, 0.0, -1.0],  # expert c is top-1
    3: [0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 2.5, 1.5, 0.2, 0.0],  # expert d is 2nd (c beats it)
    4: [1.0, 0.0, 0.0, 0.0, 4.0, 3.0, 2.0, 0.0, 0.5, 2.5],  # expert e (0.5) is 6th
}


class HandLogits(torch.nn.Module):
    """A stand-in causal LM: the same hand-set logits at each position of every row."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the module a device
        table = torch.zeros(8, V)
        for pos, row in LOGITS.items():
            table[pos] = torch.tensor(row)
        self.register_buffer("table", table)

    def forward(self, input_ids, attention_mask=None):
        batch, width = input_ids.shape
        return SimpleNamespace(logits=self.table[:width].expand(batch, width, V).clone())


def _by_hand(logits: list[float], expert: int) -> dict[str, float]:
    """Every per-token statistic from one row of logits, in plain Python."""
    z = sum(math.exp(x) for x in logits)
    p = [math.exp(x) / z for x in logits]
    rank = 1 + sum(1 for q in p if q > p[expert])
    entropy = -sum(q * math.log(q) for q in p)
    stats = {
        "cross_entropy": -math.log(p[expert]),
        "expert_rank": float(rank),
        "reciprocal_rank": 1.0 / rank,
        "normalized_entropy": entropy / math.log(len(p)),
        "margin": max(p) - p[expert],
        "wrong_confidence": max(p),
        "wrong": rank > 1,
    }
    for k in (1, 2, 3, 5):
        stats[f"top{k}_accuracy"] = 1.0 if rank <= k else 0.0
    return stats


@pytest.fixture(scope="module")
def tokenizer():
    return build_word_tokenizer(WORDS)


def test_three_token_solution_matches_hand_computation(tokenizer):
    tokens = [_by_hand(LOGITS[2], 6), _by_hand(LOGITS[3], 7), _by_hand(LOGITS[4], 8)]
    assert [t["expert_rank"] for t in tokens] == [1.0, 2.0, 6.0]  # the example covers hits and misses

    results = proxy_metrics(HandLogits(), tokenizer, [("a b", "c d e")], batch_size=1)
    assert set(results) == {f"proxy_{s}" for s in STATISTICS}
    for stat in STATISTICS:
        if stat == "wrong_confidence":
            expected = (tokens[1]["wrong_confidence"] + tokens[2]["wrong_confidence"]) / 2
        else:
            expected = sum(t[stat] for t in tokens) / 3
        got = results[f"proxy_{stat}"]
        assert got.value == pytest.approx(expected, abs=1e-6), stat
        assert got.n == 1
        assert got.stderr is None  # one item: no spread to estimate
    assert results["proxy_top1_accuracy"].value == pytest.approx(1 / 3)
    assert results["proxy_top5_accuracy"].value == pytest.approx(2 / 3)
    assert results["proxy_expert_rank"].value == pytest.approx(3.0)


def test_inverse_frequency_weighting_and_stderr_over_items(tokenizer):
    # Item 2 is "c c": tokens c (pos 2, rank 1) and c (pos 3, where c is top-1 as well).
    items = [("a b", "c d e"), ("a b", "c c")]
    t1 = [_by_hand(LOGITS[2], 6), _by_hand(LOGITS[3], 7), _by_hand(LOGITS[4], 8)]
    t2 = [_by_hand(LOGITS[2], 6), _by_hand(LOGITS[3], 6)]
    # Counts over all solution tokens: c three times, d and e once.
    w1 = [1 / 3, 1.0, 1.0]
    w2 = [1 / 3, 1 / 3]
    results = proxy_metrics(HandLogits(), tokenizer, items, batch_size=2, weighting="inverse_frequency")
    for stat in ("cross_entropy", "reciprocal_rank", "margin", "normalized_entropy", "top1_accuracy"):
        v1 = sum(w * t[stat] for w, t in zip(w1, t1, strict=True)) / sum(w1)
        v2 = sum(w * t[stat] for w, t in zip(w2, t2, strict=True)) / sum(w2)
        got = results[f"proxy_{stat}"]
        assert got.value == pytest.approx((v1 + v2) / 2, abs=1e-6), stat
        assert got.stderr == pytest.approx(abs(v1 - v2) / 2, abs=1e-6), stat  # std of two / sqrt(2)
        assert got.per_item == pytest.approx((v1, v2), abs=1e-6)
        assert got.weighting == "inverse_frequency"
    # Item 2 has no wrong token: it has no wrong_confidence and is left out of that mean.
    wrong = results["proxy_wrong_confidence"]
    assert wrong.n == 1
    assert wrong.per_item[1] is None
    expected = (w1[1] * t1[1]["wrong_confidence"] + w1[2] * t1[2]["wrong_confidence"]) / (w1[1] + w1[2])
    assert wrong.value == pytest.approx(expected, abs=1e-6)


def test_batch_size_does_not_matter(tokenizer):
    items = [("a b", "c d e"), ("a b", "c c"), ("a", "b c")]
    one = proxy_metrics(HandLogits(), tokenizer, items, batch_size=1)
    three = proxy_metrics(HandLogits(), tokenizer, items, batch_size=3)
    for key in one:
        assert one[key].per_item == pytest.approx(three[key].per_item, abs=1e-6)


def test_bad_arguments(tokenizer):
    with pytest.raises(ValueError, match="weighting"):
        proxy_metrics(HandLogits(), tokenizer, [("a b", "c")], weighting="idf")
    with pytest.raises(ValueError, match="no items"):
        proxy_metrics(HandLogits(), tokenizer, [])
    with pytest.raises(ValueError, match="item 1: solution"):
        proxy_metrics(HandLogits(), tokenizer, [("a b", "c"), ("a b", "")])
