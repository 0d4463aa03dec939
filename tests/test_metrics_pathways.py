"""Routing pathways: hand-made router outputs with known pathways, a plain-Python
Levenshtein reference, hand-computed consistency, real tiny OLMoE/Mixtral models."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from analysis.metrics.pathways import (
    PathwayDistanceConfig,
    capture_routing,
    consistency_cosines,
    group_by_memorisation,
    group_expert_load,
    group_pathway_consistency,
    group_pathway_distance,
    group_routing_entropy,
    levenshtein,
    levenshtein_batch,
    mean_pairwise_distance,
    memorised_from,
    normalize_by_max,
    pathway_consistency,
    pathway_distance,
    pathway_string,
    pathway_tokens,
    pathways_from_weights,
    routing_entropy,
    routing_profile,
)

# Tiny tensors: one intra-op thread (the fixture in conftest.py says why).
pytestmark = pytest.mark.usefixtures("one_thread")


def reference_levenshtein(x, y) -> int:
    """Textbook two-row dynamic programme, unit costs."""
    prev = list(range(len(y) + 1))
    for i, cx in enumerate(x, 1):
        cur = [i]
        for j, cy in enumerate(y, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (cx != cy)))
        prev = cur
    return prev[-1]


# --- a fake MoE whose router outputs are written by hand ---------------------------------------------

# Router softmax weights per (layer, sample, token), E = 4 experts, threshold 0.7.
# Sample 0 is left-padded: its position 0 routes everything to expert 3 and must be ignored.
JUNK = [0.01, 0.01, 0.01, 0.97]
WEIGHTS = [
    [  # layer 0
        [JUNK, [0.6, 0.3, 0.05, 0.05], [0.4, 0.3, 0.2, 0.1]],  # mean [.5 .3 .125 .075] -> 0,1
        [[0.1, 0.75, 0.1, 0.05]] * 3,  # -> 1
        [[0.1, 0.75, 0.1, 0.05]] * 3,  # -> 1
    ],
    [  # layer 1
        [JUNK, [0.1, 0.1, 0.7, 0.1], [0.05, 0.05, 0.85, 0.05]],  # mean [.075 .075 .775 .075] -> 2
        [[0.05, 0.05, 0.5, 0.4]] * 3,  # -> 2,3
        [[0.05, 0.05, 0.4, 0.5]] * 3,  # -> 3,2
    ],
]
MASK = torch.tensor([[0, 1, 1], [1, 1, 1], [1, 1, 1]])
EXPECTED_PATHWAYS = [((0, 1), (2,)), ((1,), (2, 3)), ((1,), (3, 2))]
EXPECTED_STRINGS = ("0,1-2", "1-2,3", "1-3,2")


class Gate(nn.Module):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)


class HandMadeMoE(nn.Module):
    """Returns fixed router logits, flattened to (B*T, E) with padding included, as transformers does."""

    def __init__(self, weights: list, routers: list[torch.Tensor], top_k: int = 1) -> None:
        super().__init__()
        self.logits = torch.tensor(weights, dtype=torch.float32).log()  # (L, B, T, E)
        n_experts = self.logits.shape[-1]
        self.config = SimpleNamespace(model_type="hand_made_moe", num_experts=n_experts, num_experts_per_tok=top_k)
        self.layers = nn.ModuleList([nn.ModuleDict({"gate": Gate(w)}) for w in routers])

    def forward(self, input_ids, attention_mask=None, output_router_logits=False, use_cache=None):
        n_experts = self.logits.shape[-1]
        router_logits = tuple(layer.reshape(-1, n_experts) for layer in self.logits) if output_router_logits else None
        return SimpleNamespace(router_logits=router_logits)


def hand_made(top_k: int = 1) -> tuple[HandMadeMoE, list[dict]]:
    gen = torch.Generator().manual_seed(0)
    routers = [torch.randn(4, 3, generator=gen) for _ in range(2)]
    batch = {"input_ids": torch.zeros(3, 3, dtype=torch.long), "attention_mask": MASK}
    return HandMadeMoE(WEIGHTS, routers, top_k), [batch]


def test_pathways_from_hand_made_weights():
    weights = np.array(
        [
            [[0.5, 0.3, 0.15, 0.05]],  # 0.5, 0.8 -> 0,1
            [[0.1, 0.6, 0.05, 0.25]],  # 0.6, 0.85 -> 1,3
            [[0.7, 0.2, 0.1, 0.0]],  # reaches 0.7 exactly with one expert -> 0
            [[0.35, 0.35, 0.2, 0.1]],  # tie: lower id first; 0.7 reached by two -> 0,1
            [[0.25, 0.25, 0.25, 0.25]],  # 0.25, 0.5, 0.75 -> 0,1,2
        ]
    )
    assert pathways_from_weights(weights, 0.7) == [((0, 1),), ((1, 3),), ((0,),), ((0, 1),), ((0, 1, 2),)]
    assert pathways_from_weights(weights[4:], 1.0) == [((0, 1, 2, 3),)]
    assert pathway_tokens(((3, 1, 5), (2, 7), (4,)), separator=8) == (3, 1, 5, 8, 2, 7, 8, 4)
    assert pathway_string(((3, 1, 5), (2, 7), (4,))) == "3,1,5-2,7-4"


def test_capture_routing_reshapes_and_masks_padding():
    model, batches = hand_made()
    layers = capture_routing(model, batches[0])
    assert len(layers) == 2 and layers[0].shape == (3, 3, 4)
    assert torch.all(layers[0][0, 0] == 0)  # padding zeroed
    assert torch.allclose(layers[1][0, 2], torch.tensor([0.05, 0.05, 0.85, 0.05]))
    empty = {"input_ids": batches[0]["input_ids"], "attention_mask": MASK * torch.tensor([[1], [0], [1]])}
    with pytest.raises(ValueError, match="sample 1 has no real token"):
        routing_profile(model, [empty])


def test_hand_made_pathways_and_distances():
    model, batches = hand_made()
    profile = routing_profile(model, batches)
    assert np.allclose(profile.weights[0, 0], [0.5, 0.3, 0.125, 0.075])
    assert pathways_from_weights(profile.weights) == EXPECTED_PATHWAYS

    tokens = group_pathway_distance(profile)
    # SEP = 4: [0,1,4,2] vs [1,4,2,3]: delete 0, insert 3 -> 2; vs [1,4,3,2]: delete 0, insert 3 -> 2;
    # [1,4,2,3] vs [1,4,3,2]: two substitutions -> 2.
    assert tokens.value == pytest.approx(2.0)
    assert tokens.extra["pathways"] == EXPECTED_STRINGS
    assert tokens.extra["exact"] is True and tokens.extra["n_pairs"] == 3
    chars = group_pathway_distance(profile, chars=True)
    # "0,1-2" vs "1-2,3": delete "0,", append ",3" -> 4; vs "1-3,2": delete "0,", insert "3," -> 4;
    # "1-2,3" vs "1-3,2": two substitutions -> 2.
    assert chars.value == pytest.approx(10 / 3)
    assert chars.name == "pathway_distance_chars"
    assert chars.per_probe == pytest.approx((4.0, 3.0, 3.0))
    # a group: samples 1 and 2 only
    assert group_pathway_distance(profile, [1, 2], chars=True).value == pytest.approx(2.0)
    # the registered entry point gives the same number
    assert pathway_distance(model, batches).value == pytest.approx(2.0)


def test_hand_made_entropy_and_load():
    model, batches = hand_made()
    profile = routing_profile(model, batches)
    # entropy: per real token and layer, H(p) / ln 4, tokens weighted equally
    per_token = []
    for layer in WEIGHTS:
        for s, sample in enumerate(layer):
            for t, p in enumerate(sample):
                if MASK[s, t]:
                    per_token.append(-sum(x * math.log(x) for x in p) / math.log(4))
    entropy = group_routing_entropy(profile)
    assert entropy.value == pytest.approx(sum(per_token) / len(per_token), rel=1e-6)
    assert routing_entropy(model, batches).value == pytest.approx(entropy.value)
    # load with top-1: layer 0 argmaxes 0,0 | 1,1,1 | 1,1,1 ; layer 1: 2,2 | 2,2,2 | 3,3,3
    load = group_expert_load(profile)
    fractions = [[2 / 8, 6 / 8, 0, 0], [0, 0, 5 / 8, 3 / 8]]
    assert np.allclose(load.extra["fractions"], fractions)
    balance = [-sum(f * math.log(f) for f in row if f > 0) / math.log(4) for row in fractions]
    assert load.value == pytest.approx(sum(balance) / 2)
    assert load.n == 8


def test_consistency_by_hand():
    # One sample, three layers, E = 2, H = 2.
    g = np.array([[[0.5, 0.5], [1.0, 0.0], [0.0, 1.0]]])
    routers = [np.eye(2), np.array([[1.0, 0.0], [0.0, -1.0]]), np.array([[-1.0, 0.0], [0.0, 1.0]])]
    # e0 = [.5, .5], e1 = [1, 0], e2 = [0, 1]: cos(e0, e1) = 1/sqrt(2), cos(e1, e2) = 0
    cos = consistency_cosines(g, routers)
    assert cos == pytest.approx(np.array([[1 / math.sqrt(2), 0.0]]))
    assert normalize_by_max(cos) == pytest.approx(np.array([[1.0, 0.0]]))
    # no positive cosine: divide by the largest |cosine| so signs survive
    assert normalize_by_max(np.array([[-0.5, -0.25]])) == pytest.approx(np.array([[-1.0, -0.5]]))
    assert normalize_by_max(np.array([[0.0, 0.0]])) == pytest.approx(np.array([[0.0, 0.0]]))
    with pytest.raises(ValueError, match="at least two MoE layers"):
        consistency_cosines(g[:, :1], routers[:1])


def test_consistency_on_hand_made_model_uses_the_router_weights():
    model, batches = hand_made()
    profile = routing_profile(model, batches)
    w0, w1 = (layer["gate"].weight.detach().double().numpy() for layer in model.layers)
    expected = []
    for g in profile.weights:
        e0, e1 = g[0] @ w0, g[1] @ w1
        expected.append(float(e0 @ e1 / np.linalg.norm(e0) / np.linalg.norm(e1)))
    raw = group_pathway_consistency(profile)
    assert raw.per_probe == pytest.approx(tuple(expected))
    assert raw.value == pytest.approx(np.mean(expected))
    norm = group_pathway_consistency(profile, normalized=True)
    assert norm.per_probe == pytest.approx(tuple(np.sign(expected)))  # one layer pair: c / c or c / |c|
    assert pathway_consistency(model, batches).value == pytest.approx(raw.value)


# --- the fast Levenshtein against the reference ----------------------------------------------------------


def test_batched_levenshtein_agrees_with_reference_on_random_inputs():
    rng = np.random.default_rng(0)
    seqs = [list(rng.integers(0, 5, size=rng.integers(0, 12))) for _ in range(300)]
    i, j = rng.integers(0, 300, 2000), rng.integers(0, 300, 2000)
    lengths = np.array([len(s) for s in seqs])
    table = np.full((300, lengths.max()), -1)
    for k, s in enumerate(seqs):
        table[k, : len(s)] = s
    fast = levenshtein_batch(table[i], lengths[i], table[j], lengths[j], chunk=256)
    slow = [reference_levenshtein(seqs[a], seqs[b]) for a, b in zip(i, j, strict=True)]
    assert fast.tolist() == slow
    words = ["".join(rng.choice(list("0123-,"), size=rng.integers(0, 10))) for _ in range(200)]
    for x, y in zip(words[:100], words[100:], strict=True):
        assert levenshtein(x, y) == reference_levenshtein(x, y)
    assert levenshtein("kitten", "sitting") == 3


def test_pairwise_mean_exact_and_subsampled():
    rng = np.random.default_rng(1)
    pool = [tuple(rng.integers(0, 6, size=rng.integers(1, 6))) for _ in range(15)]
    seqs = [pool[k] for k in rng.integers(0, 15, size=120)]  # repeats, as trained routers produce
    brute = np.mean([reference_levenshtein(seqs[a], seqs[b]) for a in range(120) for b in range(a + 1, 120)])
    exact = mean_pairwise_distance(seqs, max_pairs=0)
    assert exact.exact and exact.n_pairs == 120 * 119 // 2
    assert exact.mean == pytest.approx(brute, rel=1e-12)
    # few distinct sequences: still exact although there are more sample pairs than max_pairs
    assert mean_pairwise_distance(seqs, max_pairs=200).exact
    many = [tuple(rng.integers(0, 6, size=rng.integers(1, 8))) for _ in range(400)]
    full = mean_pairwise_distance(many, max_pairs=0)
    sub = mean_pairwise_distance(many, max_pairs=5000, seed=3)
    assert not sub.exact and sub.n_pairs == 5000
    assert abs(sub.mean - full.mean) < 3 * sub.stderr
    assert sub.mean == mean_pairwise_distance(many, max_pairs=5000, seed=3).mean  # seeded
    with pytest.raises(ValueError, match="at least 2 samples"):
        mean_pairwise_distance(seqs[:1])


def test_distance_config_validation():
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\]"):
        PathwayDistanceConfig(threshold=1.5)
    with pytest.raises(ValueError, match="max_pairs"):
        PathwayDistanceConfig(max_pairs=-1)


# --- real tiny models ----------------------------------------------------------------------------------------


def tiny_batch() -> dict[str, torch.Tensor]:
    ids = torch.tensor([[0, 0, 5, 6, 7], [4, 8, 9, 10, 11], [3, 3, 4, 5, 6]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    return {"input_ids": ids, "attention_mask": mask}


def olmoe():
    from transformers import OlmoeForCausalLM

    from analysis.models import tiny_moe_config

    torch.manual_seed(0)
    config = tiny_moe_config(12, hidden_size=16, num_layers=2, num_experts=4, top_k=2, num_heads=2, max_positions=16)
    return OlmoeForCausalLM(config).eval()


def mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=12,
        hidden_size=16,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=16,
    )
    return MixtralForCausalLM(config).eval()


@pytest.mark.parametrize("build", [olmoe, mixtral])
def test_real_moe_routing_matches_the_router_modules(build, device):
    model = build().to(device)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0.0, 1.0)  # spread routing beyond the tiny init
    batch = tiny_batch()
    seen = []
    hooks = [layer.mlp.gate.register_forward_hook(lambda m, i, o: seen.append(o[0])) for layer in model.model.layers]
    try:
        layers = capture_routing(model, batch)
    finally:
        for h in hooks:
            h.remove()
    assert len(layers) == 2
    for probs, logits in zip(layers, seen, strict=True):
        expected = torch.softmax(logits.float().cpu(), -1).view(3, 5, 4) * batch["attention_mask"][..., None]
        assert torch.allclose(probs.cpu(), expected, atol=1e-6)
    assert torch.allclose(layers[0].sum(-1).cpu(), batch["attention_mask"].float(), atol=1e-5)
    profile = routing_profile(model, [batch], device=device)
    assert profile.routers is not None and len(profile.routers) == 2
    assert np.allclose(profile.routers[1], model.model.layers[1].mlp.gate.weight.detach().cpu().numpy())
    assert np.allclose(profile.topk_counts.sum(axis=(0, 2)), 2 * 13)  # 13 real tokens, top-2
    result = pathway_consistency(model, [batch], device=device)
    assert -1 <= result.value <= 1 and result.n == 3


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_dense_model_is_refused_with_a_clear_message(kind):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    if kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=12, n_embd=8, n_layer=1, n_head=2, n_positions=16))
    else:
        config = LlamaConfig(
            vocab_size=12, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2
        )
        model = LlamaForCausalLM(config)
    message = f"this metric needs a mixture-of-experts model (router logits); {kind} has none"
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        capture_routing(model, tiny_batch())
    with pytest.raises(ValueError, match="mixture-of-experts"):
        pathway_distance(model, [tiny_batch()])


# --- memorisation ------------------------------------------------------------------------------------------


def test_memorised_from_by_hand():
    steps = [10, 20, 30, 40]
    losses = np.array(
        [
            # s0    s1    s2    s3    s4
            [2.00, 0.05, 0.01, 0.09, 0.01],
            [0.08, 0.50, 0.02, 0.09, 0.01],
            [0.05, 0.04, 0.03, 0.02, np.nan],
            [0.06, 0.03, 0.20, 0.02, 0.01],
        ]
    )
    # s0: from 20 on <= 0.1 and within 0.05 of 0.06 -> 20. s1: the 0.5 at 20 breaks the run -> 30.
    # s2: final loss 0.2 > eps -> never. s3: 0.09 is 0.07 above the final 0.02 -> 30. s4: NaN at 30 -> 40.
    first = memorised_from(losses, steps, eps=0.1, delta=0.05)
    assert first.tolist() == [20, 30, -1, 30, 40]
    groups = group_by_memorisation(first)
    assert {k: v.tolist() for k, v in groups.items()} == {-1: [2], 20: [0], 30: [1, 3], 40: [4]}
    binned = group_by_memorisation(first, bins=[0, 25])
    assert {k: v.tolist() for k, v in binned.items()} == {-1: [2], 0: [0], 25: [1, 3, 4]}
    with pytest.raises(ValueError, match="strictly increasing"):
        memorised_from(losses, [10, 30, 20, 40], eps=0.1)
    with pytest.raises(ValueError, match="one row per step"):
        memorised_from(losses, [10, 20, 30], eps=0.1)


def test_pair_means_from_rapidfuzz_equal_the_reference_kernel_and_the_sample_covers_them():
    rng = np.random.default_rng(5)
    seqs = [tuple(rng.integers(0, 6, rng.integers(0, 9)).tolist()) for _ in range(120)]  # duplicates, empty ones
    seqs += seqs[:30]
    exact = mean_pairwise_distance(seqs)
    n = len(seqs)
    want = np.mean([reference_levenshtein(seqs[i], seqs[j]) for i in range(n) for j in range(i + 1, n)])
    assert exact.exact and exact.n_pairs == n * (n - 1) // 2 and exact.mean == pytest.approx(want, rel=1e-12)
    sampled = mean_pairwise_distance(seqs, max_pairs=3000, seed=1)
    assert not sampled.exact and sampled.n_pairs == 3000
    assert abs(sampled.mean - want) <= 4 * sampled.stderr
