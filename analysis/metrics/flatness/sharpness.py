"""Sharpness: the loss increase under weight noise (adaptive, fixed relative size) or one SAM ascent step.

First-order or zeroth-order measures that need no Hessian-vector product; see
:mod:`analysis.metrics.flatness` for the shared conventions (per-token loss, batch-clustered
standard errors, weights restored after every perturbation).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from analysis.metrics.common import (
    Batch,
    LossFn,
    MetricResult,
    Progress,
    Ticker,
    check_batches,
    check_non_negative_number,
    check_positive_int,
    check_subset,
    clustered_result,
    config_params,
    cpu_generator,
    lm_loss,
    norm,
    randn_like,
    select_params,
    to_device,
    total_loss,
    working_model,
)
from analysis.metrics.flatness.hessian import gradient


@dataclass(frozen=True)
class AdaptiveSharpnessConfig:
    """E[L(w + d)] - L(w) with d ~ N(0, (rho * |w|)^2) elementwise, over ``n_samples`` draws."""

    rho: float = 0.01
    n_samples: int = 8
    subset: str = "all"

    def __post_init__(self) -> None:
        check_non_negative_number("adaptive_sharpness", "rho", self.rho)
        check_positive_int("adaptive_sharpness", "n_samples", self.n_samples)
        check_subset(self.subset)


@dataclass(frozen=True)
class PerturbationConfig:
    """Loss increase under noise of relative size ``sigma``: per tensor, std = sigma * RMS(W)."""

    sigma: float = 0.01
    n_samples: int = 8
    subset: str = "all"

    def __post_init__(self) -> None:
        check_non_negative_number("perturbation_sensitivity", "sigma", self.sigma)
        check_positive_int("perturbation_sensitivity", "n_samples", self.n_samples)
        check_subset(self.subset)


@dataclass(frozen=True)
class SamConfig:
    """One-step SAM sharpness, or ASAM with ``adaptive`` (ascent scaled by |w|)."""

    rho: float = 0.05
    adaptive: bool = False
    subset: str = "all"

    def __post_init__(self) -> None:
        check_non_negative_number("sam_sharpness", "rho", self.rho)
        if not isinstance(self.adaptive, bool):
            raise ValueError(f"sam_sharpness: adaptive must be true or false, got {self.adaptive!r}")
        check_subset(self.subset)


# --- loss under weight noise ------------------------------------------------------------------------


def _noise_sharpness(
    name: str,
    model: nn.Module,
    batches: Sequence[Batch],
    config: AdaptiveSharpnessConfig | PerturbationConfig,
    noise: Callable[[torch.Tensor, torch.Generator], torch.Tensor],
    device: torch.device | str,
    seed: int,
    loss_fn: LossFn,
    progress: Progress | None = None,
) -> MetricResult:
    """Mean and stderr of L_b(w + d) - L_b(w) over batches b and draws d; weights written back bitwise after.

    Every batch gets its own ``n_samples`` draws, so the batch means are independent
    given the data and :func:`batch_clustered_mean` applies (one shared set of draws
    would put the draw-to-draw variation into every batch mean alike, where the
    standard error of the batch means cannot see it). The cost is the same forward
    passes as shared draws: n_samples + 1 per batch.
    """
    check_batches(batches)
    gen = cpu_generator(seed)
    ticker = Ticker(progress, len(batches) * config.n_samples)
    device = torch.device(device)
    values: list[list[float]] = []
    counts: list[int] = []
    base_sum = 0.0
    with working_model(model, device) as work, torch.no_grad():
        params = [p for _, p in select_params(work, config.subset)]
        saved = [p.detach().clone() for p in params]
        try:
            for batch in batches:
                batch = to_device(batch, device)
                base_loss, count = loss_fn(work, batch)
                base = float(base_loss)
                diffs: list[float] = []
                for _ in range(config.n_samples):
                    for p, w in zip(params, saved, strict=True):
                        p.copy_(w + noise(w, gen))
                    diffs.append(float(loss_fn(work, batch)[0]) - base)
                    ticker.tick()
                for p, w in zip(params, saved, strict=True):
                    p.copy_(w)
                values.append(diffs)
                counts.append(count)
                base_sum += base * count
        finally:
            for p, w in zip(params, saved, strict=True):
                p.copy_(w)
    return clustered_result(name, values, counts, config, seed, {"loss": base_sum / sum(counts)})


def adaptive_sharpness(
    model: nn.Module,
    batches: Sequence[Batch],
    config: AdaptiveSharpnessConfig | None = None,
    *,
    device: torch.device | str = "cpu",
    seed: int = 0,
    loss_fn: LossFn = lm_loss,
    progress: Progress | None = None,
) -> MetricResult:
    """Average-case adaptive sharpness E[L(w + d)] - L(w), d ~ N(0, (rho |w|)^2) elementwise.

    The noise on each weight is proportional to its magnitude, which makes the measure
    invariant to rescalings of layers that leave the function unchanged. Each batch gets
    ``n_samples`` draws of its own; ``stderr`` is the standard error of the B batch means,
    for the data distribution the probe batches are a sample of (batch-to-batch and
    draw variation, B - 1 degrees of freedom); with one batch, the draw noise for that
    batch only (``stderr_covers == "probes"``).
    """
    config = config or AdaptiveSharpnessConfig()

    def noise(w: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return config.rho * w.abs() * randn_like(w, gen)

    return _noise_sharpness("adaptive_sharpness", model, batches, config, noise, device, seed, loss_fn, progress)


def perturbation_sensitivity(
    model: nn.Module,
    batches: Sequence[Batch],
    config: PerturbationConfig | None = None,
    *,
    device: torch.device | str = "cpu",
    seed: int = 0,
    loss_fn: LossFn = lm_loss,
    progress: Progress | None = None,
) -> MetricResult:
    """Loss increase under Gaussian weight noise of fixed relative size, mean over draws.

    Each tensor W gets d = sigma * ||W||_F / sqrt(numel(W)) * N(0, I): noise whose size
    relative to the tensor's RMS weight is the same for every tensor and checkpoint, so a
    rise across checkpoints means the weights became more sensitive, not bigger. Each
    batch gets ``n_samples`` draws of its own; ``stderr`` is the standard error of the B
    batch means, for the data distribution the probe batches are a sample of
    (batch-to-batch and draw variation, B - 1 degrees of freedom); with one batch, the
    draw noise for that batch only (``stderr_covers == "probes"``).
    """
    config = config or PerturbationConfig()

    def noise(w: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        rms = torch.linalg.vector_norm(w) / math.sqrt(w.numel())
        return config.sigma * rms * randn_like(w, gen)

    return _noise_sharpness("perturbation_sensitivity", model, batches, config, noise, device, seed, loss_fn, progress)


# --- SAM ---------------------------------------------------------------------------------------


def _pooled_gradient(
    model: nn.Module, params: Sequence[torch.Tensor], batches: Sequence[Batch], loss_fn: LossFn, device: torch.device
) -> tuple[list[torch.Tensor], float]:
    """The gradient of the token-weighted loss over all ``batches``, and that loss."""
    grads = [torch.zeros_like(p) for p in params]
    loss_sum, n_total = 0.0, 0
    with torch.enable_grad():
        for batch in batches:
            loss, count = loss_fn(model, to_device(batch, device))
            for acc, g in zip(grads, gradient(loss, params), strict=True):
                acc.add_(g, alpha=count)
            loss_sum += float(loss.detach()) * count
            n_total += count
    return [g / n_total for g in grads], loss_sum / n_total


def _ascent_direction(
    params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], adaptive: bool
) -> tuple[Sequence[torch.Tensor], torch.Tensor]:
    """The unscaled ascent step and the norm that scales it to length rho: g and ||g|| (SAM),
    T^2 g and ||T g|| with T = diag(|w|) (ASAM)."""
    if adaptive:
        scales = [p.detach().abs() for p in params]
        direction = [t * t * g for t, g in zip(scales, grads, strict=True)]
        return direction, norm([t * g for t, g in zip(scales, grads, strict=True)])
    return grads, norm(grads)


def sam_sharpness(
    model: nn.Module,
    batches: Sequence[Batch],
    config: SamConfig | None = None,
    *,
    device: torch.device | str = "cpu",
    seed: int = 0,
    loss_fn: LossFn = lm_loss,
) -> MetricResult:
    """One-step SAM sharpness L(w + eps) - L(w) along the normalised gradient.

    SAM: eps = rho g / ||g||. ASAM (``adaptive``): eps = rho T^2 g / ||T g|| with
    T = diag(|w|), the first-order maximiser of L over the ellipsoid ||T^{-1} eps|| <= rho.
    g is the gradient of the token-weighted loss over all batches. Deterministic given
    the batches, so ``stderr`` is None: the value is that of these batches' loss, and
    how it would vary over other batches from the data distribution is not estimated
    (one ascent step on the pooled gradient has no per-batch values to compare).
    ``seed`` is recorded only. A zero gradient gives 0.
    """
    config = config or SamConfig()
    check_batches(batches)
    device = torch.device(device)
    with working_model(model, device) as work:
        params = [p for _, p in select_params(work, config.subset)]
        grads, base = _pooled_gradient(work, params, batches, loss_fn, device)
        with torch.no_grad():
            direction, size = _ascent_direction(params, grads, config.adaptive)
            grad_norm = float(norm(grads))
            if float(size) == 0.0:
                value, perturbed = 0.0, base
            else:
                saved = [p.detach().clone() for p in params]
                try:
                    for p, d in zip(params, direction, strict=True):
                        p.add_(d, alpha=config.rho / float(size))
                    perturbed = total_loss(work, batches, loss_fn, device)
                finally:
                    for p, w in zip(params, saved, strict=True):
                        p.copy_(w)
                value = perturbed - base
    return MetricResult(
        name="sam_sharpness",
        value=value,
        stderr=None,
        n=1,
        per_probe=(value,),
        params=config_params(config, seed),
        extra={"loss": base, "perturbed_loss": perturbed, "grad_norm": grad_norm},
    )
