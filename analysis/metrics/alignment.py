"""Gradient alignment across data domains, with a same-domain noise ceiling.

Definitions (DESIGN.md, "Gradient alignment across domains"):

- Domains. Each sample of a batch belongs to one domain: a batch may carry ``domain_id``,
  a (B,) integer tensor with one id per sample; a batch without it is all domain 0. The
  job runner's probe batches give each probe file (domain) its index in sorted name
  order, so a probe folder with ``heldout.jsonl`` and ``train.jsonl`` has ids 0 and 1.
- Domain gradient g_d: the gradient, w.r.t. the selected parameters (config ``subset``,
  as for the flatness metrics), of the token-weighted mean loss over all samples of
  domain d: sum_b N_{b,d} grad L_{b,d} / sum_b N_{b,d}, L_{b,d} the mean loss of domain
  d's rows of batch b and N_{b,d} their predicted tokens. Rows are scored on their own,
  so g_d does not depend on how samples were batched.
- Cross-domain alignment: cos(g_d, g_e) for d != e. The metric's value is the mean over
  unordered domain pairs. A zero gradient has cosine 0 with everything.
- Noise ceiling of domain d: its samples are split into two halves A and B by a seeded
  random permutation, and cos(g_{d,A}, g_{d,B}) is averaged over ``n_splits`` splits.
  Two batches of the same text do not give parallel gradients either; the ceiling is how
  aligned gradients get when the only difference is sampling noise. ``extra["ceiling"]``
  is the mean over domains, ``extra["normalized"]`` = value / ceiling.

  Each half has half the samples, so its gradient is noisier than a full domain
  gradient and the ceiling is lower than the cosine two independent full-size draws of
  one domain would reach. Modelling a gradient as mean + noise whose size shrinks as
  1/sqrt(samples), a half-split cosine c corresponds to a full-size cosine of
  2c / (1 + c) (the Spearman-Brown formula); it is reported as
  ``extra["ceiling_full_size"]`` for comparing with the cross-domain cosines, and
  ``extra["normalized_full_size"]`` = value / that. On the demo probes (train vs
  held-out modular arithmetic, 16 samples each) the half-split ceiling is ~0.89 and the
  cross-domain cosine ~0.94 (normalized ~1.05), while the full-size ceiling is ~0.94.

Alignment between training text and task text is the two-domain case: put the training
text and the task's text (prompts and answers rendered as plain text, one sample a line)
in one probe folder, e.g. ``probes/train.jsonl`` and ``probes/task.jsonl``, and run
``gradient_alignment`` on it; the value is cos(g_task, g_train) (ids 0 and 1 in sorted
name order) and the matrix's diagonal holds each one's ceiling::

    python -m analysis metric gradient_alignment --checkpoint CKPT --data probes/

With a single domain there is no pair to compare: the value is that domain's ceiling
(``extra["single_domain"]`` is True).

Cost: ``n_splits`` forward and backward passes over the probe samples (the two halves of
the first split give each domain's full gradient too), in float32 on a copy for
low-precision models (:func:`analysis.metrics.common.working_model`). Memory: one
gradient vector per domain plus two, each the size of the selected parameters.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from analysis.metrics.common import (
    Batch,
    LossFn,
    MetricResult,
    Progress,
    Ticker,
    check_batches,
    check_subset,
    config_params,
    cpu_generator,
    lm_loss,
    mean_stderr,
    select_params,
    to_device,
    working_model,
)

Vector = list[torch.Tensor]  # a parameter-space vector, one tensor per selected parameter
Sample = tuple[int, int]  # (batch index, row within the batch)


@dataclass(frozen=True)
class GradientAlignmentConfig:
    """Cosines between domain gradients, with a same-domain ceiling from ``n_splits`` half-splits."""

    subset: str = "all"  # which parameters: see common.select_params
    n_splits: int = 4  # random half-splits per domain averaged into the noise ceiling

    def __post_init__(self) -> None:
        check_subset(self.subset)
        if isinstance(self.n_splits, bool) or not isinstance(self.n_splits, int) or self.n_splits < 1:
            raise ValueError(f"gradient_alignment: n_splits must be a positive integer, got {self.n_splits!r}")


# --- which sample belongs to which domain --------------------------------------------------------


def _batch_size(batch: Batch, index: int) -> int:
    ids = batch.get("domain_id")
    if ids is not None:
        if not isinstance(ids, torch.Tensor) or ids.dim() != 1:
            raise ValueError(f"batch {index}: domain_id must be a 1-D tensor with one id per sample")
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise ValueError(f"batch {index}: domain_id must hold integers (a LongTensor), got {ids.dtype}")
        inputs = batch.get("input_ids")
        if isinstance(inputs, torch.Tensor) and inputs.shape[0] != ids.shape[0]:
            raise ValueError(
                f"batch {index}: domain_id has {ids.shape[0]} ids for {inputs.shape[0]} samples; give one id per row"
            )
        return int(ids.shape[0])
    inputs = batch.get("input_ids")
    if isinstance(inputs, torch.Tensor) and inputs.dim() >= 1:
        return int(inputs.shape[0])
    raise ValueError(f"batch {index} has neither input_ids nor domain_id: cannot tell its samples apart")


def domain_samples(batches: Sequence[Batch]) -> dict[int, list[Sample]]:
    """The (batch index, row) of every sample, grouped by domain id (ascending); no domain_id = 0."""
    out: dict[int, list[Sample]] = {}
    for b, batch in enumerate(batches):
        size = _batch_size(batch, b)
        ids = batch["domain_id"].tolist() if "domain_id" in batch else [0] * size
        for row, d in enumerate(ids):
            out.setdefault(int(d), []).append((b, row))
    return dict(sorted(out.items()))


def _rows(batch: Batch, rows: list[int], size: int) -> Batch:
    """The batch restricted to ``rows``: every tensor whose first dimension is the batch's."""
    if len(rows) == size:
        return batch
    index = torch.tensor(rows, dtype=torch.long)
    return {
        k: v[index.to(v.device)] if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == size else v
        for k, v in batch.items()
    }


# --- gradients -------------------------------------------------------------------------------------


def _samples_gradient(
    model: nn.Module,
    batches: Sequence[Batch],
    samples: Sequence[Sample],
    params: Sequence[torch.Tensor],
    device: torch.device,
    loss_fn: LossFn,
) -> tuple[Vector, int]:
    """Gradient of the token-weighted mean loss over ``samples``, and their predicted tokens."""
    by_batch: dict[int, list[int]] = {}
    for b, row in samples:
        by_batch.setdefault(b, []).append(row)
    total = [torch.zeros_like(p, memory_format=torch.contiguous_format) for p in params]
    n_total = 0
    with torch.enable_grad():
        for b in sorted(by_batch):
            part = _rows(batches[b], sorted(by_batch[b]), _batch_size(batches[b], b))
            loss, count = loss_fn(model, to_device(part, device))
            # allow_unused: experts no token of this part was routed to have no gradient: zeros.
            grads = torch.autograd.grad(loss, list(params), allow_unused=True, materialize_grads=True)
            for acc, g in zip(total, grads, strict=True):
                acc.add_(g.detach(), alpha=count)
            n_total += count
    if n_total == 0:
        raise ValueError("gradient_alignment: a domain's samples have no predicted tokens")
    return [t / n_total for t in total], n_total


def domain_gradients(
    model: nn.Module,
    batches: Sequence[Batch],
    params: Sequence[torch.Tensor],
    device: torch.device | str,
    *,
    loss_fn: LossFn = lm_loss,
) -> dict[int, list[torch.Tensor]]:
    """Each domain's gradient of its token-weighted mean loss w.r.t. ``params``, by domain id.

    ``params`` must be tensors of ``model`` with requires_grad; the model is used as it is
    (call inside :func:`analysis.metrics.common.working_model` for eval mode and fp32).
    Gradients are returned detached; ``.grad`` of the parameters is not touched.
    """
    check_batches(batches)
    device = torch.device(device)
    return {
        d: _samples_gradient(model, batches, samples, params, device, loss_fn)[0]
        for d, samples in domain_samples(batches).items()
    }


def _cosine(x: Sequence[torch.Tensor], y: Sequence[torch.Tensor]) -> float:
    xy = xx = yy = 0.0
    for a, b in zip(x, y, strict=True):
        a, b = a.double(), b.double()  # one tensor at a time: float64 sums over millions of terms
        xy += float((a * b).sum())
        xx += float((a * a).sum())
        yy += float((b * b).sum())
    if xx == 0.0 or yy == 0.0:
        return 0.0
    return max(-1.0, min(1.0, xy / math.sqrt(xx * yy)))


def alignment_matrix(grads: Mapping[int, Sequence[torch.Tensor]] | Sequence[Sequence[torch.Tensor]]) -> np.ndarray:
    """(D, D) float64 cosines between gradient vectors (a mapping is taken in ascending key order).

    Each vector is a list of tensors (one per parameter). The diagonal is 1 for a non-zero
    vector; a zero vector has cosine 0 with every vector, itself included.
    """
    vectors = [grads[k] for k in sorted(grads)] if isinstance(grads, Mapping) else list(grads)
    n = len(vectors)
    out = np.zeros((n, n), dtype=np.float64)
    for i in range(n):
        for j in range(i, n):
            out[i, j] = out[j, i] = _cosine(vectors[i], vectors[j])
    return out


# --- the metric ----------------------------------------------------------------------------------------


def gradient_alignment(
    model: nn.Module,
    batches: Sequence[Batch],
    config: GradientAlignmentConfig | None = None,
    *,
    device: torch.device | str = "cpu",
    seed: int = 0,
    loss_fn: LossFn = lm_loss,
    progress: Progress | None = None,
) -> MetricResult:
    """Mean cosine between different domains' loss gradients, with a same-domain ceiling.

    See the module docstring for the definitions. ``extra``: ``domains`` (ids, ascending),
    ``matrix`` (domain x domain cosines, diagonal = each domain's ceiling, None for a domain
    of one sample), ``ceiling`` (mean diagonal), ``normalized`` (value / ceiling when the
    ceiling is > 0, else None), ``ceiling_full_size`` and ``normalized_full_size`` (the
    Spearman-Brown step-up, see above), ``ceiling_stderr`` (over splits),
    ``single_domain``, and ``n_samples`` and ``n_tokens`` (lists in ``domains`` order).

    ``stderr``: with several domains None, because the value is a deterministic function
    of the probe samples (the split seed only moves the ceiling; its Monte-Carlo error is
    ``extra["ceiling_stderr"]``). With one domain the value is the ceiling, and ``stderr``
    is that split-to-split standard error. ``per_probe`` holds the pair cosines (or, with
    one domain, the per-split ceilings); ``n`` is the number of samples. ``progress(i, n)``
    follows the gradients computed (two per split of each domain, one for a one-sample domain).
    """
    config = config or GradientAlignmentConfig()
    check_batches(batches)
    device = torch.device(device)
    groups = domain_samples(batches)
    domains = list(groups)
    gen = cpu_generator(seed)
    ticker = Ticker(progress, sum(1 if len(s) < 2 else 2 * config.n_splits for s in groups.values()))
    grads: dict[int, Vector] = {}
    tokens: dict[int, int] = {}
    split_cosines: dict[int, list[float]] = {d: [] for d in domains}
    with working_model(model, device) as work:
        params = [p for _, p in select_params(work, config.subset)]
        for d in domains:
            samples = groups[d]
            n = len(samples)
            if n < 2:  # nothing to split: the full gradient only
                grads[d], tokens[d] = _samples_gradient(work, batches, samples, params, device, loss_fn)
                ticker.tick()
                continue
            for split in range(config.n_splits):
                order = torch.randperm(n, generator=gen).tolist()
                first = [samples[i] for i in order[: n // 2]]
                second = [samples[i] for i in order[n // 2 :]]
                g_a, n_a = _samples_gradient(work, batches, first, params, device, loss_fn)
                ticker.tick()
                g_b, n_b = _samples_gradient(work, batches, second, params, device, loss_fn)
                ticker.tick()
                split_cosines[d].append(_cosine(g_a, g_b))
                if split == 0:  # the halves' token-weighted mean is the domain's gradient
                    grads[d] = [(a * n_a + b * n_b) / (n_a + n_b) for a, b in zip(g_a, g_b, strict=True)]
                    tokens[d] = n_a + n_b
                del g_a, g_b
    matrix = alignment_matrix(grads)
    ceilings = {d: math.fsum(c) / len(c) for d, c in split_cosines.items() if c}
    rows = [
        [ceilings.get(d) if i == j else float(matrix[i, j]) for j in range(len(domains))] for i, d in enumerate(domains)
    ]
    ceiling = math.fsum(ceilings.values()) / len(ceilings) if ceilings else None
    with_ceiling = [d for d in domains if d in ceilings]
    per_split = (
        [math.fsum(split_cosines[d][s] for d in with_ceiling) / len(with_ceiling) for s in range(config.n_splits)]
        if with_ceiling
        else []
    )
    ceiling_stderr = mean_stderr(per_split)[1] if per_split else None
    full = 2 * ceiling / (1 + ceiling) if ceiling is not None and ceiling > 0 else None
    single = len(domains) == 1
    if single:
        if ceiling is None:
            raise ValueError(
                "gradient_alignment: one domain with a single sample has no pair of gradients to compare; "
                "add samples (for a ceiling) or a second domain (domain_id per sample)"
            )
        value, stderr, per_probe = ceiling, ceiling_stderr, tuple(per_split)
    else:
        per_probe = tuple(float(matrix[i, j]) for i in range(len(domains)) for j in range(i + 1, len(domains)))
        value, stderr = math.fsum(per_probe) / len(per_probe), None
    extra = {
        "domains": domains,
        "matrix": rows,
        "ceiling": ceiling,
        "normalized": value / ceiling if ceiling is not None and ceiling > 0 else None,
        "ceiling_full_size": full,
        "normalized_full_size": value / full if full is not None else None,
        "ceiling_stderr": ceiling_stderr,
        "single_domain": single,
        "n_samples": [len(groups[d]) for d in domains],
        "n_tokens": [tokens[d] for d in domains],
        "n_params": sum(p.numel() for p in params),
    }
    if single:
        extra["note"] = "one domain: the value is its same-domain ceiling, not a cross-domain cosine"
    return MetricResult(
        name="gradient_alignment",
        value=value,
        stderr=stderr,
        n=sum(len(s) for s in groups.values()),
        per_probe=per_probe,
        params=config_params(config, seed),
        extra=extra,
    )
