"""The Fisher trace: squared gradient norms under labels sampled from the model's own predictions.

Cheap next to the Hessian trace (one forward and a backward per label draw, no double backward),
so it scales to larger models; see :mod:`analysis.metrics.flatness` for the shared conventions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from analysis.metrics.common import (
    Batch,
    MetricResult,
    Progress,
    Ticker,
    check_batches,
    check_positive_int,
    check_subset,
    clustered_result,
    cpu_generator,
    dot,
    lm_logits,
    prediction_mask,
    select_params,
    to_device,
    working_model,
)
from analysis.metrics.flatness.hessian import gradient


@dataclass(frozen=True)
class FisherTraceConfig:
    """Fisher trace from labels sampled from the model: ``n_samples`` label draws per batch."""

    n_samples: int = 4
    subset: str = "all"

    def __post_init__(self) -> None:
        check_positive_int("fisher_trace", "n_samples", self.n_samples)
        check_subset(self.subset)


def fisher_trace(
    model: nn.Module,
    batches: Sequence[Batch],
    config: FisherTraceConfig | None = None,
    *,
    device: torch.device | str = "cpu",
    seed: int = 0,
    progress: Progress | None = None,
) -> MetricResult:
    """Per-token trace of the (true) Fisher information of the language model.

    Target: (1/N) sum_i E_{y ~ p(.|x_i)} ||grad log p(y | x_i)||^2 over the N predicted
    positions i, i.e. the average per-token Fisher trace (the Fisher counterpart of the
    per-token Hessian trace). Estimator, per batch and label draw: sample one label y_i
    for every position from the model's own distribution (seeded), take the gradient g of
    the mean loss (1/N_b) sum_i -log p(y_i | x_i), and report N_b ||g||^2. It is unbiased:
    E||g||^2 = (1/N_b^2) [sum_i E||s_i||^2 + sum_{i != j} E[s_i] . E[s_j]], the labels are
    drawn independently given the fixed inputs and the score has mean zero
    (E_y grad log p(y|x) = 0), so the cross terms vanish and N_b E||g||^2 is the batch's
    per-token Fisher trace. One forward per batch and one backward per draw; batches are
    combined token-weighted as for the Hessian trace.

    ``stderr`` is the standard error of the B batch means, for the data distribution the
    probe batches are a sample of (batch-to-batch and label-draw variation, B - 1
    degrees of freedom); with one batch, the label-draw noise for that batch only
    (``stderr_covers == "probes"``). ``progress(i, n)`` follows the n = B * n_samples draws.
    """
    config = config or FisherTraceConfig()
    check_batches(batches)
    gen = cpu_generator(seed)
    ticker = Ticker(progress, len(batches) * config.n_samples)
    values: list[list[float]] = []
    counts: list[int] = []
    with working_model(model, device) as work, torch.enable_grad():
        params = [p for _, p in select_params(work, config.subset)]
        for batch in batches:
            batch = to_device(batch, device)
            valid = prediction_mask(batch)  # (B, T-1)
            count = int(valid.sum())
            if count == 0:
                raise ValueError("fisher_trace: a batch has no predicted tokens (samples need two real tokens)")
            log_probs = torch.log_softmax(lm_logits(work, batch), dim=-1)[valid]  # (N_b, V)
            probs = log_probs.detach().exp().cpu().double()  # sample on the CPU generator
            draws = []
            for _ in range(config.n_samples):
                labels = torch.multinomial(probs, 1, generator=gen).to(log_probs.device)  # (N_b, 1)
                loss = -log_probs.gather(1, labels).mean()
                grads = gradient(loss, params, retain_graph=True)
                draws.append(count * float(dot(grads, grads)))
                ticker.tick()
            values.append(draws)
            counts.append(count)
            del log_probs
    return clustered_result("fisher_trace", values, counts, config, seed, {})
