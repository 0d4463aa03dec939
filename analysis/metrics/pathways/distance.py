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
from analysis.metrics.pathways.edit_distance import sequence_codes
from analysis.metrics.pathways.extraction import pathway_string, pathway_tokens, pathways_from_weights
from analysis.metrics.pathways.routing import RoutingProfile, routing_profile, sample_indices


@dataclass(frozen=True)
class PathwayDistanceConfig:
    """Pathway distances: the cumulative-weight threshold and a bound on distance evaluations."""

    threshold: float = 0.7  # keep top experts until their summed weight reaches this
    # Distinct pairs scored exactly up to this many (5M: about 3,160 distinct pathways, 0.5 s here), a
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


def mean_pairwise_distance(seqs: Sequence[Sequence[int]], *, max_pairs: int = 5_000_000, seed: int = 0) -> PairwiseMean:
    """Mean Levenshtein distance over all unordered pairs of ``seqs``.

    Identical sequences are scored once: with U distinct sequences, when all
    N(N-1)/2 pairs, or the U(U-1)/2 distinct pairs, number at most ``max_pairs`` (or
    ``max_pairs`` is 0), the mean over all pairs is exact. Otherwise ``max_pairs`` pairs
    are drawn uniformly with replacement (seeded).

    Standard error: the mean is a U-statistic of the samples, with variance about
    4 zeta_1 / N, zeta_1 the variance over samples of each one's mean distance to the
    others; a subsample adds var(d) / n_pairs. None for fewer than 3 samples.
    """
    n = len(seqs)
    if n < 2:
        raise ValueError(f"pathway distance needs at least 2 samples in a group, got {n}")
    keys = [tuple(s) for s in seqs]
    distinct: dict[tuple[int, ...], int] = {}
    index = np.array([distinct.setdefault(k, len(distinct)) for k in keys])  # (N,) sample -> distinct id
    uniq = list(distinct)
    u = len(uniq)
    total_pairs = n * (n - 1) // 2
    if max_pairs == 0 or min(total_pairs, u * (u - 1) // 2) <= max_pairs:
        # Every distinct pair at once, in C (rapidfuzz); levenshtein_batch is the reference the tests hold it to.
        dist = process.cdist(uniq, uniq, scorer=Levenshtein.distance, dtype=np.int32).astype(np.float64)
        counts = np.bincount(index, minlength=u).astype(np.float64)
        per_distinct = dist @ counts  # sum of distances from one sample of each kind to all samples
        per_sample = per_distinct[index] / (n - 1)
        mean = float(per_distinct @ counts / 2 / total_pairs)
        var_pairs, n_pairs, exact = 0.0, total_pairs, True
    else:
        rng = np.random.default_rng(seed)
        first = rng.integers(0, n, size=max_pairs)
        second = rng.integers(0, n - 1, size=max_pairs)
        second = second + (second >= first)  # uniform over the other samples
        ua, ub = index[first], index[second]
        d = process.cpdist([uniq[k] for k in ua], [uniq[k] for k in ub], scorer=Levenshtein.distance).astype(np.float64)
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
    paths = pathways_from_weights(profile.weights[idx], config.threshold)
    seqs: list[Sequence[int]]
    if chars:
        seqs = [sequence_codes(pathway_string(p)) for p in paths]
    else:
        seqs = [pathway_tokens(p, separator=profile.weights.shape[-1]) for p in paths]
    pm = mean_pairwise_distance(seqs, max_pairs=config.max_pairs, seed=seed)
    return MetricResult(
        name="pathway_distance_chars" if chars else "pathway_distance",
        value=pm.mean,
        stderr=pm.stderr,
        n=len(idx),
        per_probe=tuple(float(x) for x in pm.per_sample),
        params=config_params(config, seed),
        extra={
            "n_pairs": pm.n_pairs,
            "exact": pm.exact,
            "n_distinct_pathways": pm.n_distinct,
            "pathways": tuple(pathway_string(p) for p in paths),
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
