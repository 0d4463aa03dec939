"""Pathway distance: the mean Levenshtein distance between the pathways of a group's samples.

Exact over all distinct pairs with rapidfuzz when they are few enough, a seeded uniform
sample of pairs otherwise; in token form (``pathway_distance``) or character form
(``pathway_distance_chars``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from rapidfuzz import process
from rapidfuzz.distance import Levenshtein
from torch import nn

from analysis.metrics.common import Batch, MetricResult, config_params
from analysis.metrics.pathways.extraction import pathway_table, pathway_texts
from analysis.metrics.pathways.routing import RoutingProfile, routing_profile, sample_indices


@dataclass(frozen=True)
class PathwayDistanceConfig:
    """Pathway distances: the cumulative-weight threshold and a bound on distance evaluations."""

    threshold: float = 0.7  # keep top experts until their summed weight reaches this
    # Distinct pairs scored exactly up to this many (5M: about 3,160 distinct pathways, 0.15 s here), a
    # uniform sample of this many above it; 0 means all pairs.
    max_pairs: int = 5_000_000

    def __post_init__(self) -> None:
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, int | float):
            raise ValueError(f"pathway: threshold must be a number in (0, 1], got {self.threshold!r}")
        if not 0 < self.threshold <= 1:
            raise ValueError(f"pathway: threshold must be in (0, 1], got {self.threshold!r}")
        if isinstance(self.max_pairs, bool) or not isinstance(self.max_pairs, int) or self.max_pairs < 0:
            raise ValueError(f"pathway: max_pairs must be an integer >= 0 (0 = all pairs), got {self.max_pairs!r}")


@dataclass(frozen=True)
class PairwiseMean:
    """The mean distance over unordered pairs of a group, with how it was obtained."""

    mean: float
    stderr: float | None
    per_sample: np.ndarray  # (N,) each sample's mean distance to the others (nan if in no pair)
    n_pairs: int  # pairs scored (all N(N-1)/2 when exact)
    exact: bool
    n_distinct: int


def mean_pairwise_distance(
    seqs: Sequence[str | Sequence[int]], *, max_pairs: int = 5_000_000, seed: int = 0
) -> PairwiseMean:
    """Mean Levenshtein distance over all unordered pairs of ``seqs`` (sequences of ints, or strings).

    Identical sequences are scored once: with U distinct sequences, when all
    N(N-1)/2 pairs, or the U(U-1)/2 distinct pairs, number at most ``max_pairs`` (or
    ``max_pairs`` is 0), the mean over all pairs is exact. Otherwise ``max_pairs`` pairs
    are drawn uniformly with replacement (seeded).

    Standard error: the mean is a U-statistic of the samples, with variance about
    4 zeta_1 / N, zeta_1 the variance over samples of each one's mean distance to the
    others; a subsample adds var(d) / n_pairs. None for fewer than 3 samples.
    """
    if len(seqs) < 2:
        raise ValueError(f"pathway distance needs at least 2 samples in a group, got {len(seqs)}")
    distinct: dict[str | tuple[int, ...], int] = {}
    keys = (s if isinstance(s, str) else tuple(s) for s in seqs)
    index = np.array([distinct.setdefault(k, len(distinct)) for k in keys])  # (N,) sample -> distinct id
    return distinct_pairwise_mean(list(distinct), index, max_pairs=max_pairs, seed=seed)


def distinct_pairwise_mean(
    distinct: Sequence[str | Sequence[int]], index: np.ndarray, *, max_pairs: int = 5_000_000, seed: int = 0
) -> PairwiseMean:
    """:func:`mean_pairwise_distance` of the samples ``distinct[index[i]]``, i = 0..N-1.

    ``distinct`` holds each different sequence once (e.g. from ``np.unique(...,
    return_inverse=True)``), ``index`` (N,) which one each sample has. Many samples sharing
    few pathways cost only the distinct pairs: identical sequences are at distance 0, so
    each distinct sequence's summed distance to all samples is a sum over the distinct
    ones weighted by how many samples have them.
    """
    index = np.asarray(index, dtype=np.int64).ravel()
    n, u = len(index), len(distinct)
    if n < 2:
        raise ValueError(f"pathway distance needs at least 2 samples in a group, got {n}")
    if index.min() < 0 or index.max() >= u:
        raise ValueError(f"pathway distance: sample indices must lie in 0..{u - 1} (one per distinct sequence)")
    total_pairs = n * (n - 1) // 2
    if max_pairs == 0 or min(total_pairs, u * (u - 1) // 2) <= max_pairs:
        counts = np.bincount(index, minlength=u)  # (U,) int64
        per_distinct = weighted_distance_sums(distinct, counts)  # (U,) int64, exact
        per_sample = per_distinct[index] / (n - 1)
        # Integer sums (exact), one division at the end: the same float as summing every pair's distance.
        mean = int(per_distinct @ counts) / 2 / total_pairs
        var_pairs, n_pairs, exact = 0.0, total_pairs, True
    else:
        rng = np.random.default_rng(seed)
        first = rng.integers(0, n, size=max_pairs)
        second = rng.integers(0, n - 1, size=max_pairs)
        second = second + (second >= first)  # uniform over the other samples
        ua, ub = index[first], index[second]
        pairs_a, pairs_b = [distinct[k] for k in ua], [distinct[k] for k in ub]
        d = process.cpdist(pairs_a, pairs_b, scorer=Levenshtein.distance).astype(np.float64)
        mean = float(d.mean())
        sums = np.bincount(first, weights=d, minlength=n) + np.bincount(second, weights=d, minlength=n)
        hits = np.bincount(first, minlength=n) + np.bincount(second, minlength=n)
        with np.errstate(invalid="ignore", divide="ignore"):
            per_sample = np.where(hits > 0, sums / hits, np.nan)
        var_pairs = float(d.var(ddof=1)) / max_pairs if max_pairs > 1 else 0.0
        n_pairs, exact = max_pairs, False
    seen = per_sample[~np.isnan(per_sample)]
    stderr = math.sqrt(4 * float(seen.var(ddof=1)) / len(seen) + var_pairs) if len(seen) >= 3 else None
    return PairwiseMean(mean, stderr, per_sample, n_pairs, exact, u)


def weighted_distance_sums(seqs: Sequence[str | Sequence[int]], counts: np.ndarray, *, band: int = 0) -> np.ndarray:
    """sum_j lev(seqs[i], seqs[j]) * counts[j] for every i: (U,) int64, exact.

    The distance matrix is scored in bands of ``band`` rows (0: about 2^18 cells a band,
    at least 32 rows) against the columns from the band's first row on: the upper
    triangle plus the bands' diagonal blocks, a bit over half the matrix. Each band adds
    its rows' sums and, by symmetry, its part of the later columns' sums. rapidfuzz scores
    a list against itself one pair at a time but a list against a different list with its
    SIMD kernels, several sequences per vector (about 3x faster here for pathway-sized
    sequences), so the two arguments are always separate list objects. One thread.
    """
    u = len(seqs)
    counts = np.asarray(counts, dtype=np.int64)
    if counts.shape != (u,):
        raise ValueError(f"pathway distance: {counts.shape} counts for {u} sequences; give one count per sequence")
    if isinstance(band, bool) or not isinstance(band, int) or band < 0:
        raise ValueError(f"pathway distance: band must be an integer >= 0 (0 = automatic), got {band!r}")
    sums = np.zeros(u, dtype=np.int64)
    if u == 0:
        return sums
    longest = max(len(s) for s in seqs)  # a distance never exceeds the longer sequence's length
    dtype = np.uint8 if longest <= np.iinfo(np.uint8).max else np.uint16 if longest <= 65_535 else np.int32
    rows = band or max(32, (1 << 18) // u)
    unweighted = bool((counts == 1).all())  # every sequence once: plain sums, about twice as fast as products
    seqs = list(seqs)
    for a in range(0, u, rows):
        b = min(a + rows, u)
        block = process.cdist(seqs[a:b], seqs[a:], scorer=Levenshtein.distance, dtype=dtype, workers=1)  # (b-a, u-a)
        if unweighted:
            sums[a:b] += block.sum(axis=1, dtype=np.int64)
            sums[b:] += block[:, b - a :].sum(axis=0, dtype=np.int64)
        else:
            sums[a:b] += block @ counts[a:]
            sums[b:] += counts[a:b] @ block[:, b - a :]
    return sums


def group_pathway_distance(
    profile: RoutingProfile,
    indices: Sequence[int] | np.ndarray | None = None,
    config: PathwayDistanceConfig | None = None,
    *,
    seed: int = 0,
    chars: bool = False,
) -> MetricResult:
    """Mean pathway distance over the pairs of a group of samples (all samples by default).

    ``per_probe`` holds each sample's mean distance to the others in the group;
    ``extra`` the pathways in character form, the number of pairs scored and whether
    the mean is exact.
    """
    config = config or PathwayDistanceConfig()
    idx = sample_indices(profile, indices)
    if len(idx) < 2:
        raise ValueError(f"pathway distance needs at least 2 samples in a group, got {len(idx)}")
    table = pathway_table(profile.weights[idx], config.threshold)  # (N, L, E)
    # Distinct pathways once each (rows of the table), and which one each sample has: both written forms and
    # all distances are computed for the distinct pathways only.
    rows, index = np.unique(table.reshape(len(idx), -1), axis=0, return_inverse=True)
    rows = rows.reshape(-1, *table.shape[1:])
    index = index.ravel()
    strings = pathway_texts(rows, chars=True)
    seqs = strings if chars else pathway_texts(rows, chars=False)
    pm = distinct_pairwise_mean(seqs, index, max_pairs=config.max_pairs, seed=seed)
    return MetricResult(
        name="pathway_distance_chars" if chars else "pathway_distance",
        value=pm.mean,
        stderr=pm.stderr,
        n=len(idx),
        per_probe=tuple(pm.per_sample.tolist()),
        params=config_params(config, seed),
        extra={
            "n_pairs": pm.n_pairs,
            "exact": pm.exact,
            "n_distinct_pathways": pm.n_distinct,
            "pathways": tuple(strings[k] for k in index.tolist()),
        },
    )


def pathway_distance(
    model: nn.Module,
    batches: Sequence[Batch],
    config: PathwayDistanceConfig | None = None,
    *,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> MetricResult:
    """Mean pairwise pathway distance (token form) over all samples of ``batches``."""
    return group_pathway_distance(routing_profile(model, batches, device=device), None, config, seed=seed)


def pathway_distance_chars(
    model: nn.Module,
    batches: Sequence[Batch],
    config: PathwayDistanceConfig | None = None,
    *,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> MetricResult:
    """Mean pairwise pathway distance (character form) over all samples of ``batches``."""
    return group_pathway_distance(routing_profile(model, batches, device=device), None, config, seed=seed, chars=True)
