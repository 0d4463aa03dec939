"""Routing entropy and expert load balance: two normalised entropies of the router, as controls.

``routing_entropy`` is the router's per-token entropy (how sure each routing decision is);
``expert_load`` the entropy of the experts' shares of the top-k assignments (how evenly the
work is spread). Neither has a preferred direction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from analysis.metrics.common import Batch, MetricResult, config_params
from analysis.metrics.pathways.routing import RoutingConfig, RoutingProfile, routing_profile, sample_indices


def group_routing_entropy(
    profile: RoutingProfile, indices: Sequence[int] | np.ndarray | None = None, *, seed: int = 0
) -> MetricResult:
    """Mean over real tokens and MoE layers of the router's entropy divided by ln E.

    0 = every token sent to one expert with certainty, 1 = uniform over all E experts.
    Tokens weigh equally (a long sample counts more). The standard error treats samples
    as clusters of tokens: sqrt(N/(N-1) sum_s (S_s - m n_s)^2) / sum_s n_s, S_s the
    sample's entropy sum over its tokens and layers and n_s its token-layer count.
    ``per_probe`` holds per-sample means; ``extra["per_layer"]`` the per-layer means.
    """
    idx = sample_indices(profile, indices)
    sums = profile.entropy_sums[idx]  # (N, L)
    n_tok = profile.n_tokens[idx].astype(np.float64)  # (N,)
    n_layers = sums.shape[1]
    per_sample_sum, per_sample_n = sums.sum(axis=1), n_tok * n_layers
    mean = float(per_sample_sum.sum() / per_sample_n.sum())
    k = len(idx)
    stderr = (
        math.sqrt(k / (k - 1) * float(((per_sample_sum - mean * per_sample_n) ** 2).sum())) / float(per_sample_n.sum())
        if k > 1
        else None
    )
    return MetricResult(
        name="routing_entropy",
        value=mean,
        stderr=stderr,
        n=k,
        per_probe=tuple(float(x) for x in per_sample_sum / per_sample_n),
        params=config_params(RoutingConfig(), seed),
        extra={"per_layer": tuple(float(x) for x in sums.sum(axis=0) / n_tok.sum())},
    )


def group_expert_load(
    profile: RoutingProfile, indices: Sequence[int] | np.ndarray | None = None, *, seed: int = 0
) -> MetricResult:
    """Load balance: normalised entropy of the experts' shares of top-k assignments.

    Per layer, f(k) = (tokens whose top-k includes expert k) / (k_top * tokens), a
    distribution over experts; balance = H(f) / ln E (1 = perfectly even load, 0 = one
    expert takes everything). The value is the mean over layers. ``extra`` has the
    fractions per layer and their coefficient of variation std(f) / mean(f).
    """
    idx = sample_indices(profile, indices)
    counts = profile.topk_counts[idx].sum(axis=0)  # (L, E)
    n_experts = counts.shape[1]
    frac = counts / counts.sum(axis=1, keepdims=True)  # (L, E)
    with np.errstate(invalid="ignore", divide="ignore"):
        ent = -np.where(frac > 0, frac * np.log(frac), 0.0).sum(axis=1)  # (L,)
    balance = ent / math.log(n_experts) if n_experts > 1 else np.ones_like(ent)
    cv = frac.std(axis=1) / frac.mean(axis=1)
    return MetricResult(
        name="expert_load",
        value=float(balance.mean()),
        stderr=None,
        n=int(profile.n_tokens[idx].sum()),
        per_probe=tuple(float(x) for x in balance),
        params=config_params(RoutingConfig(), seed),
        extra={
            "fractions": tuple(tuple(float(x) for x in row) for row in frac),
            "cv": tuple(float(x) for x in cv),
            "top_k": profile.top_k,
        },
    )


def routing_entropy(
    model: nn.Module,
    batches: Sequence[Batch],
    config: RoutingConfig | None = None,
    *,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> MetricResult:
    """Normalised router entropy over all real tokens and MoE layers of ``batches``."""
    return group_routing_entropy(routing_profile(model, batches, device=device), seed=seed)


def expert_load(
    model: nn.Module,
    batches: Sequence[Batch],
    config: RoutingConfig | None = None,
    *,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> MetricResult:
    """Expert load balance over all real tokens of ``batches``."""
    return group_expert_load(routing_profile(model, batches, device=device), seed=seed)
