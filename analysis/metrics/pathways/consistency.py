"""Pathway consistency: how well consecutive MoE layers' routing-weighted expert embeddings line up.

Per sample, the mean over consecutive layers of cos(e_l, e_{l+1}), e_l the router weight rows
weighted by the sample's averaged routing; raw (``pathway_consistency``) or divided by the
sample's largest cosine (``pathway_consistency_normalized``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from analysis.metrics.common import Batch, MetricResult, config_params
from analysis.metrics.pathways.routing import RoutingConfig, RoutingProfile, routing_profile, sample_indices


def consistency_cosines(weights: np.ndarray, routers: Sequence[np.ndarray]) -> np.ndarray:
    """cos(e_l, e_{l+1}) per sample and consecutive layer pair: (N, L-1).

    e_l = g_l @ W_l, g (N, L, E) averaged router weights and W_l (E, H) layer l's router
    weight. A zero e_l (possible only with zero router rows) gives cosine 0.

    The embeddings are never formed: with the Gram matrices G_lm = W_l W_m^T (E, E),
    e_l . e_m = g_l G_lm g_m, so the work per sample is L E^2 instead of L E H (H is the
    hidden size, in the thousands for real models) and no (N, L, H) array is held. The
    per-sample products use np.einsum, which does not hand such small products to a
    multithreaded BLAS.
    """
    weights = np.asarray(weights, dtype=np.float64)
    if weights.ndim != 3:
        raise ValueError(f"pathway consistency: weights must be (samples, layers, experts), got shape {weights.shape}")
    if weights.shape[1] != len(routers):
        raise ValueError(f"{weights.shape[1]} MoE layers of weights but {len(routers)} router matrices")
    if len(routers) < 2:
        raise ValueError("pathway consistency needs at least two MoE layers (it compares consecutive layers)")
    if len({w.shape[1] for w in routers}) != 1:
        raise ValueError("router weights of consecutive layers have different hidden sizes; cosine is undefined")
    mats = [np.asarray(w, np.float64) for w in routers]
    cosines = np.empty((weights.shape[0], len(mats) - 1))
    # |e_l|^2, clipped at 0: rounding can leave a tiny negative where e_l is (numerically) zero.
    sq = [np.maximum(np.einsum("ne,ef,nf->n", weights[:, k], w @ w.T, weights[:, k]), 0.0) for k, w in enumerate(mats)]
    for k in range(len(mats) - 1):
        dots = np.einsum("ne,ef,nf->n", weights[:, k], mats[k] @ mats[k + 1].T, weights[:, k + 1])  # (N,)
        denom = np.sqrt(sq[k] * sq[k + 1])
        with np.errstate(invalid="ignore", divide="ignore"):
            cosines[:, k] = np.where(denom > 0, dots / denom, 0.0)
    return cosines


def normalize_by_max(cosines: np.ndarray) -> np.ndarray:
    """Each sample's cosines divided by its largest cosine: (N, L-1) -> (N, L-1).

    With a positive largest cosine m the values are c / m (<= 1, the largest is 1). When
    no cosine is positive, dividing by m <= 0 would flip signs or divide by zero, so the
    sample's largest |cosine| is used instead (values keep their signs, in [-1, 1]); a
    sample whose cosines are all zero stays zero.
    """
    cosines = np.asarray(cosines, dtype=np.float64)
    top = cosines.max(axis=1, keepdims=True)  # (N, 1)
    scale = np.where(top > 0, top, np.abs(cosines).max(axis=1, keepdims=True))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(scale > 0, cosines / scale, 0.0)


def group_pathway_consistency(
    profile: RoutingProfile,
    indices: Sequence[int] | np.ndarray | None = None,
    *,
    normalized: bool = False,
    seed: int = 0,
) -> MetricResult:
    """Mean over samples of the mean consecutive-layer cosine (raw or max-normalised).

    ``per_probe`` holds the per-sample values; ``extra["per_layer_pair"]`` the mean
    cosine of each consecutive layer pair (raw or normalised alike).
    """
    if profile.routers is None:
        raise ValueError(
            f"pathway consistency needs the router weight matrices, which were not found in {profile.model_type}"
        )
    idx = sample_indices(profile, indices)
    if len(idx) == 0:
        raise ValueError("pathway consistency: the group has no samples")
    cos = consistency_cosines(profile.weights[idx], profile.routers)  # (N, L-1)
    if normalized:
        cos = normalize_by_max(cos)
    per_sample = cos.mean(axis=1)
    mean = float(per_sample.mean())
    stderr = float(per_sample.std(ddof=1) / math.sqrt(len(per_sample))) if len(per_sample) > 1 else None
    return MetricResult(
        name="pathway_consistency_normalized" if normalized else "pathway_consistency",
        value=mean,
        stderr=stderr,
        n=len(idx),
        per_probe=tuple(per_sample.tolist()),
        params=config_params(RoutingConfig(), seed),
        extra={"per_layer_pair": tuple(float(x) for x in cos.mean(axis=0))},
    )


def pathway_consistency(
    model: nn.Module,
    batches: Sequence[Batch],
    config: RoutingConfig | None = None,
    *,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> MetricResult:
    """Mean raw pathway consistency over all samples of ``batches``."""
    return group_pathway_consistency(routing_profile(model, batches, device=device), seed=seed)


def pathway_consistency_normalized(
    model: nn.Module,
    batches: Sequence[Batch],
    config: RoutingConfig | None = None,
    *,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> MetricResult:
    """Mean max-normalised pathway consistency over all samples of ``batches``."""
    return group_pathway_consistency(routing_profile(model, batches, device=device), normalized=True, seed=seed)
