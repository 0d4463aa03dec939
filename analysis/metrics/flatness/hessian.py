"""Gradients, Hessian-vector products by double backward, and Hutchinson's Hessian trace.

The HVP helpers here are shared by the other flatness metrics (:mod:`.eigen`, :mod:`.fisher`,
:mod:`.sharpness`); see :mod:`analysis.metrics.flatness` for the conventions all of them follow.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from analysis.metrics.common import (
    Batch,
    LossFn,
    MetricResult,
    Progress,
    Ticker,
    check_batches,
    check_positive_int,
    check_subset,
    clustered_result,
    cpu_generator,
    dot,
    lm_loss,
    rademacher_like,
    select_params,
    to_device,
    working_model,
)

Vector = list[torch.Tensor]  # a parameter-space vector, one tensor per selected parameter


@dataclass(frozen=True)
class HessianTraceConfig:
    """Hutchinson's estimator: ``n_probes`` Rademacher probes for each batch."""

    # Probes per batch; the estimate uses n_probes * len(batches) values. 4, not 16: at Pythia-160m size on a
    # 2-core CPU a probe is a Hessian-vector product of ~90 s (README, Benchmarks: 49 min per checkpoint at 16,
    # ~14 min at 4), and batch-to-batch variation dominates the stderr (over batch means): the clustered stderr
    # was 3.4x the probes-only one at 16 probes on a 162M checkpoint (package docstring), so the batch variance
    # is ~2.4x one probe's and 4 probes widen the stderr by ~4% (2: ~9%). No version bump: n_probes is in the
    # cache key, so values computed with 16 stay a setting of their own.
    n_probes: int = 4
    subset: str = "all"  # which parameters: see common.select_params

    def __post_init__(self) -> None:
        check_positive_int("hessian_trace", "n_probes", self.n_probes)
        check_subset(self.subset)


# --- derivatives --------------------------------------------------------------------------


def gradient(output: torch.Tensor, params: Sequence[torch.Tensor], **kwargs: Any) -> Vector:
    """d output / d params, one tensor per parameter; ``kwargs`` go to ``torch.autograd.grad``."""
    # allow_unused: experts no token was routed to have no gradient; they count as zeros.
    return list(torch.autograd.grad(output, params, allow_unused=True, materialize_grads=True, **kwargs))


def hessian_vector_product(grads: Vector, params: Sequence[torch.Tensor], v: Vector) -> Vector:
    """H v = d(g . v)/dw by double backward, from gradients built with create_graph=True."""
    gv = dot(grads, v)
    if not gv.requires_grad:  # the gradient does not depend on the weights: H = 0 here
        return [torch.zeros_like(p) for p in params]
    return gradient(gv, params, retain_graph=True)


def make_hvp_operator(
    model: nn.Module,
    params: Sequence[torch.Tensor],
    batches: Sequence[Batch],
    loss_fn: LossFn,
    device: torch.device,
) -> Callable[[Vector], Vector]:
    """v -> H v for the token-weighted loss over ``batches``: sum_b N_b H_b v / sum_b N_b.

    A single batch keeps its first-derivative graph between calls; with several batches
    the graph is rebuilt for every product so memory stays at one batch's.
    Call inside ``sdpa_kernel(SDPBackend.MATH)`` with grad mode on.
    """
    cached: list[tuple[Vector, int]] = []
    if len(batches) == 1:
        loss, count = loss_fn(model, to_device(batches[0], device))
        cached.append((gradient(loss, params, create_graph=True), count))

    def apply(v: Vector) -> Vector:
        total = [torch.zeros_like(p) for p in params]
        n_total = 0
        for batch in batches if not cached else []:
            loss, count = loss_fn(model, to_device(batch, device))
            grads = gradient(loss, params, create_graph=True)
            for acc, h in zip(total, hessian_vector_product(grads, params, v), strict=True):
                acc.add_(h.detach(), alpha=count)
            n_total += count
            del grads
        for grads, count in cached:
            for acc, h in zip(total, hessian_vector_product(grads, params, v), strict=True):
                acc.add_(h.detach(), alpha=count)
            n_total += count
        return [acc / n_total for acc in total]

    return apply


# --- Hessian trace -----------------------------------------------------------------------------


def hutchinson_probes(
    hvp: Callable[[Vector], Vector],
    like: Sequence[torch.Tensor],
    n_probes: int,
    gen: torch.Generator,
    ticker: Ticker | None = None,
) -> list[float]:
    """``n_probes`` values v^T H v, v Rademacher shaped like ``like``, each an unbiased estimate of tr(H).

    ``hvp`` is v -> H v for one fixed operator (one batch's Hessian); pure apart from the
    draws taken from ``gen``. ``ticker`` counts each finished probe.
    """
    values = []
    for _ in range(n_probes):
        v = [rademacher_like(p, gen) for p in like]
        values.append(float(dot(v, hvp(v))))
        if ticker is not None:
            ticker.tick()
    return values


def hessian_trace(
    model: nn.Module,
    batches: Sequence[Batch],
    config: HessianTraceConfig | None = None,
    *,
    device: torch.device | str = "cpu",
    seed: int = 0,
    loss_fn: LossFn = lm_loss,
    progress: Progress | None = None,
) -> MetricResult:
    """Per-token Hessian trace by Hutchinson's estimator with Rademacher probes.

    For each batch b and probe v (entries ±1), v^T H_b v is an unbiased estimate of
    tr(H_b), H_b the Hessian of batch b's mean loss over the selected parameters; the
    value is the token-weighted mean over batches, i.e. the trace of the Hessian of the
    mean-per-token loss. ``stderr`` is the standard error of the B batch means: it refers
    to the data distribution the probe batches are a sample of, and counts the
    batch-to-batch and the probe variation (``stderr_covers == "batches"``, B - 1
    degrees of freedom). With one batch it is the probe noise for that batch only
    (``stderr_covers == "probes"``). ``extra["stderr_probes_only"]`` is the error due to
    the probes alone, for these fixed batches. ``progress(i, n)`` follows the n = B * n_probes
    probes.
    """
    config = config or HessianTraceConfig()
    check_batches(batches)
    gen = cpu_generator(seed)
    ticker = Ticker(progress, len(batches) * config.n_probes)
    values: list[list[float]] = []
    counts: list[int] = []
    with working_model(model, device) as work, torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
        params = [p for _, p in select_params(work, config.subset)]
        for batch in batches:
            loss, count = loss_fn(work, to_device(batch, device))
            grads = gradient(loss, params, create_graph=True)
            values.append(
                # partial binds this batch's gradients now, not the loop variable's last value
                hutchinson_probes(
                    functools.partial(hessian_vector_product, grads, params), params, config.n_probes, gen, ticker
                )
            )
            counts.append(count)
            del grads, loss
        n_params = sum(p.numel() for p in params)
    return clustered_result("hessian_trace", values, counts, config, seed, {"n_params": n_params})
