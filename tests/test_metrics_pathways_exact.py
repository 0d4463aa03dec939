"""The vectorised pathway code gives the same numbers as the per-sample formulas it replaced.

Pathways as a table and strings (all samples at once) against pathways_from_weights,
pathway_string and pathway_tokens one sample at a time; the banded, count-weighted
rapidfuzz distance sums against every pair scored by the project's NumPy Levenshtein
kernel; consistency from Gram matrices against the expert embeddings it no longer forms.
Random profiles with many repeated pathways, plus the edge cases: two samples, one
pathway shared by all, groups too small to have a pair.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from analysis.metrics.pathways import (
    PathwayDistanceConfig,
    RoutingProfile,
    consistency_cosines,
    distinct_pairwise_mean,
    group_pathway_consistency,
    group_pathway_distance,
    levenshtein_pairs,
    mean_pairwise_distance,
    pad_sequences,
    pathway_string,
    pathway_table,
    pathway_texts,
    pathway_tokens,
    pathways_from_weights,
    sequence_codes,
    weighted_distance_sums,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def loop_pathways(weights: np.ndarray, threshold: float) -> list[tuple[tuple[int, ...], ...]]:
    """The per-sample loop pathways_from_weights used before the table: rank, cumulate, cut, one sample at a time."""
    out = []
    for sample in np.asarray(weights, dtype=np.float64):
        layers = []
        for g in sample:
            order = np.argsort(-g, kind="stable")
            total, kept = 0.0, []
            for e in order:
                kept.append(int(e))
                total += g[e]
                if total >= threshold - 1e-9:
                    break
            layers.append(tuple(kept))
        out.append(tuple(layers))
    return out


def random_weights(rng: np.random.Generator, n: int, n_layers: int, n_experts: int, repeats: bool) -> np.ndarray:
    """(N, L, E) routing weights; with ``repeats``, drawn from a few prototypes (so pathways repeat) and with ties."""
    if not repeats:
        return rng.dirichlet(np.full(n_experts, 0.5), size=(n, n_layers))
    pool = rng.dirichlet(np.full(n_experts, 0.5), size=(6, n_layers))
    pool[0] = 1.0 / n_experts  # all tied: ranked by id
    return pool[rng.integers(0, len(pool), size=n)]


def profile_of(weights: np.ndarray, routers: tuple[np.ndarray, ...] | None = None) -> RoutingProfile:
    n, n_layers, n_experts = weights.shape
    return RoutingProfile(
        weights=weights,
        entropy_sums=np.zeros((n, n_layers)),
        n_tokens=np.ones(n, dtype=np.int64),
        topk_counts=np.zeros((n, n_layers, n_experts)),
        top_k=1,
        routers=routers,
        model_type="random",
    )


def pairwise_by_kernel(seqs: list[list[int]]) -> tuple[float, np.ndarray]:
    """Mean over all sample pairs and each sample's mean distance to the others, every pair by the NumPy kernel."""
    n = len(seqs)
    table, lengths = pad_sequences(seqs, -1)
    i, j = np.triu_indices(n, k=1)
    d = levenshtein_pairs(table, lengths, i, table, lengths, j)
    full = np.zeros((n, n), dtype=np.int64)
    full[i, j] = d
    full[j, i] = d
    return int(d.sum()) / len(d), full.sum(axis=1) / (n - 1)


@pytest.mark.parametrize(("n_layers", "n_experts"), [(1, 1), (2, 3), (3, 8), (2, 12), (2, 101)])
def test_table_and_strings_equal_the_per_sample_pathways(n_layers, n_experts):
    rng = np.random.default_rng(n_layers * 1000 + n_experts)
    for threshold in (0.3, 0.7, 1.0):
        for repeats in (False, True):
            weights = random_weights(rng, 60, n_layers, n_experts, repeats)
            paths = loop_pathways(weights, threshold)
            assert pathways_from_weights(weights, threshold) == paths
            table = pathway_table(weights, threshold)
            assert pathway_texts(table, chars=True) == [pathway_string(p) for p in paths]
            tokens = [pathway_tokens(p, separator=n_experts) for p in paths]
            texts = pathway_texts(table, chars=False)
            # one character per token, one-to-one: the same equalities, so the same Levenshtein distances
            assert [len(t) for t in texts] == [len(t) for t in tokens]
            recoded = {
                (a, b) for text, toks in zip(texts, tokens, strict=True) for a, b in zip(text, toks, strict=True)
            }
            assert len(recoded) == len({a for a, _ in recoded}) == len({b for _, b in recoded})
    assert pathway_texts(pathway_table(np.zeros((0, 2, 4))), chars=True) == []
    with pytest.raises(ValueError, match=r"pathway weights must be \(samples, layers, experts\)"):
        pathway_table(np.ones((3, 4)))
    with pytest.raises(ValueError, match=r"pathway table must be \(samples, layers, experts\)"):
        pathway_texts(np.ones((3, 4), dtype=np.int64), chars=True)


@pytest.mark.parametrize("band", [0, 1, 7, 32])
def test_banded_weighted_sums_equal_the_full_matrix(band):
    rng = np.random.default_rng(band)
    seqs = ["".join(rng.choice(list("0123,-"), size=rng.integers(0, 12))) for _ in range(70)]
    seqs[5] = ""  # an empty pathway string: distance = the other's length
    counts = rng.integers(0, 4, size=len(seqs))
    table, lengths = pad_sequences([sequence_codes(s) for s in seqs], -1)
    i, j = np.meshgrid(np.arange(len(seqs)), np.arange(len(seqs)), indexing="ij")
    full = levenshtein_pairs(table, lengths, i.ravel(), table, lengths, j.ravel()).reshape(len(seqs), -1)
    assert weighted_distance_sums(seqs, counts, band=band).tolist() == (full @ counts).tolist()
    ones = np.ones(len(seqs), dtype=np.int64)
    assert weighted_distance_sums(seqs, ones, band=band).tolist() == full.sum(axis=1).tolist()
    assert weighted_distance_sums(seqs[:1], counts[:1], band=band).tolist() == [0]
    assert weighted_distance_sums([], np.zeros(0, dtype=np.int64)).tolist() == []
    with pytest.raises(ValueError, match="one count per sequence"):
        weighted_distance_sums(seqs, counts[:-1])
    with pytest.raises(ValueError, match="band must be an integer >= 0"):
        weighted_distance_sums(seqs, counts, band=-1)


@pytest.mark.parametrize("chars", [False, True])
@pytest.mark.parametrize("repeats", [False, True])
def test_group_distance_equals_every_pair_by_the_reference_kernel(chars, repeats):
    rng = np.random.default_rng(int(chars) * 2 + int(repeats))
    weights = random_weights(rng, 90, 3, 12, repeats)  # two-digit expert ids in the character form
    profile = profile_of(weights)
    for group in (None, rng.integers(0, 90, size=40), np.array([3, 3, 3]), np.array([7, 8])):
        idx = np.arange(90) if group is None else group
        paths = loop_pathways(weights[idx], 0.7)
        seqs = [sequence_codes(pathway_string(p)) if chars else list(pathway_tokens(p, 12)) for p in paths]
        mean, per_sample = pairwise_by_kernel(seqs)
        result = group_pathway_distance(profile, group, chars=chars)
        assert result.extra["exact"] and result.extra["n_pairs"] == len(idx) * (len(idx) - 1) // 2
        assert result.value == mean  # exact: integer sums, one division, as when every pair is summed
        assert result.per_probe == tuple(per_sample.tolist())
        assert result.extra["pathways"] == tuple(pathway_string(p) for p in paths)
        assert result.extra["n_distinct_pathways"] == len(set(paths))
        want_stderr = math.sqrt(4 * float(per_sample.var(ddof=1)) / len(idx)) if len(idx) >= 3 else None
        assert result.stderr == want_stderr
    if repeats:
        assert group_pathway_distance(profile, np.array([3, 3, 3]), chars=chars).value == 0.0
    for tiny in ([], [4]):
        with pytest.raises(ValueError, match="at least 2 samples in a group"):
            group_pathway_distance(profile, tiny, chars=chars)


@pytest.mark.parametrize("chars", [False, True])
def test_sampled_group_distance_equals_the_sequence_form(chars):
    # Above max_pairs distinct pairs the mean is sampled; distinct strings must draw and score the same pairs
    # as the per-sample sequences of ints did.
    rng = np.random.default_rng(9)
    weights = random_weights(rng, 120, 2, 8, repeats=False)
    config = PathwayDistanceConfig(max_pairs=500)
    result = group_pathway_distance(profile_of(weights), None, config, seed=4, chars=chars)
    paths = pathways_from_weights(weights, 0.7)
    seqs = [sequence_codes(pathway_string(p)) if chars else pathway_tokens(p, 8) for p in paths]
    want = mean_pairwise_distance(seqs, max_pairs=500, seed=4)
    assert not result.extra["exact"] and result.extra["n_pairs"] == 500
    assert result.value == want.mean and result.stderr == want.stderr
    assert np.array_equal(np.array(result.per_probe), want.per_sample, equal_nan=True)


def test_strings_and_code_lists_give_the_same_pairwise_mean():
    rng = np.random.default_rng(2)
    words = ["".join(rng.choice(list("0123-,"), size=rng.integers(0, 8))) for _ in range(50)]
    words += words[:20]
    as_text = mean_pairwise_distance(words)
    as_codes = mean_pairwise_distance([sequence_codes(w) for w in words])
    assert as_text.mean == as_codes.mean and as_text.stderr == as_codes.stderr
    assert as_text.per_sample.tolist() == as_codes.per_sample.tolist()
    assert as_text.n_distinct == len(set(words))
    with pytest.raises(ValueError, match=r"sample indices must lie in 0\.\.1"):
        distinct_pairwise_mean(["ab", "b"], np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="at least 2 samples"):
        distinct_pairwise_mean(["ab"], np.array([0]))


def embedding_cosines(weights: np.ndarray, routers: list[np.ndarray]) -> np.ndarray:
    """The formula consistency_cosines used before the Gram matrices: e_l = g_l W_l, then cosines."""
    emb = np.stack([weights[:, k] @ w for k, w in enumerate(routers)], axis=1)  # (N, L, H)
    norms = np.linalg.norm(emb, axis=-1)
    dots = (emb[:, :-1] * emb[:, 1:]).sum(axis=-1)
    denom = norms[:, :-1] * norms[:, 1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, dots / denom, 0.0)


def test_gram_cosines_equal_the_embedding_cosines():
    rng = np.random.default_rng(3)
    weights = random_weights(rng, 80, 4, 6, repeats=True)
    routers = [rng.normal(size=(6, 40)) for _ in range(4)]
    got = consistency_cosines(weights, routers)
    # The same numbers up to float64 rounding (products summed in another order), and within [-1, 1].
    assert np.allclose(got, embedding_cosines(weights, routers), rtol=1e-12, atol=1e-13)
    assert np.abs(got).max() <= 1 + 1e-12
    profile = profile_of(weights, tuple(routers))
    raw = group_pathway_consistency(profile, rng.integers(0, 80, size=30))
    assert raw.n == 30 and -1 <= raw.value <= 1
    # A layer whose router rows are zero has e_l = 0: cosine 0 next to it, never NaN.
    routers[2] = np.zeros((6, 40))
    zeroed = consistency_cosines(weights, routers)
    assert np.array_equal(zeroed[:, 1:3], np.zeros((80, 2))) and not np.isnan(zeroed).any()
    assert np.allclose(zeroed, embedding_cosines(weights, routers), rtol=1e-12, atol=1e-13)
    with pytest.raises(ValueError, match="MoE layers of weights but 4 router matrices"):
        consistency_cosines(weights[:, :3], routers)
    with pytest.raises(ValueError, match=r"weights must be \(samples, layers, experts\)"):
        consistency_cosines(weights[0], routers)
