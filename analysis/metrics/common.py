"""What every metric shares: the batch type, the result record, the loss, parameter subsets.

Conventions used by all metric functions in this package:

- A ``Batch`` is a dict with ``input_ids`` (B, T) and ``attention_mask`` (B, T) tensors.
- "The loss" (:func:`lm_loss`) is the mean cross-entropy over every predicted token: the
  label of position t is the token at t+1, and a prediction counts only when both the
  context position t and the target position t+1 are real tokens (attention_mask == 1).
  With left padding this drops the prediction of the first real token from a pad
  position, which would otherwise be scored from a context the model never sees in
  practice. Over several batches the loss is token-weighted: sum_b N_b L_b / sum_b N_b.
- Maths runs in at least float32 with the model in eval mode. A model stored in
  bf16/fp16, or on another device than the one asked for, is evaluated on a float32 copy
  (:func:`working_model`); an fp32 or fp64 model on the right device is used in place and
  handed back exactly as it came (training flag, requires_grad flags and, for the
  perturbation metrics, the weights themselves, restored in ``finally``).
- Randomness comes from a CPU ``torch.Generator`` seeded with the ``seed`` argument, and
  random tensors are moved to the device afterwards, so a seed gives the same probes on
  every device.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

Batch = dict[str, torch.Tensor]
# A loss function returns (mean loss over its items, number of items averaged over);
# the count weights batches so that several batches give the loss of their union.
LossFn = Callable[[nn.Module, Batch], tuple[torch.Tensor, int]]
NamedParams = list[tuple[str, nn.Parameter]]


@dataclass(frozen=True)
class MetricResult:
    """One metric evaluated on one model.

    ``value`` is the estimate; ``stderr`` its standard error where the metric is an
    estimate (None for deterministic metrics); ``n`` the number of probes, draws or
    samples behind it; ``per_probe`` the individual values whose mean is ``value`` (or,
    where a metric says so, per-sample values); ``params`` the config fields plus the
    seed; ``extra`` vectors and diagnostics (per-layer values, iteration counts).
    """

    name: str
    value: float
    stderr: float | None
    n: int
    per_probe: tuple[float, ...] = ()
    params: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


# --- batches and the loss -------------------------------------------------------------


def to_device(batch: Batch, device: torch.device | str) -> Batch:
    """The batch with every tensor moved to ``device``."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def prediction_mask(batch: Batch) -> torch.Tensor:
    """Which positions' next-token predictions count: (B, T-1) bool.

    Position t predicts token t+1; it counts when both are real tokens.
    """
    ids = batch["input_ids"]  # (B, T)
    mask = batch.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(ids)
    mask = mask.bool()
    return mask[:, :-1] & mask[:, 1:]  # (B, T-1)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def lm_logits(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Next-token logits of the predicting positions, (B, T-1, V), in at least float32."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False)
    logits = out.logits[:, :-1]  # (B, T-1, V)
    return logits.to(compute_dtype(logits.dtype))


def lm_loss(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy over the batch's predicted tokens, and their number.

    See the module docstring for which tokens count. Raises ValueError for a batch with
    no predicted token (every sample shorter than two real tokens).
    """
    valid = prediction_mask(batch)  # (B, T-1)
    n = int(valid.sum())
    if n == 0:
        raise ValueError("batch has no predicted tokens: every sample needs at least two real (unpadded) tokens")
    logits = lm_logits(model, batch)  # (B, T-1, V)
    targets = batch["input_ids"][:, 1:].masked_fill(~valid, -100)  # (B, T-1)
    loss = nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum"
    )
    return loss / n, n


def batch_losses(
    model: nn.Module, batches: Sequence[Batch], loss_fn: LossFn, device: torch.device
) -> tuple[list[torch.Tensor], list[int]]:
    """Each batch's (mean loss, count), batches moved to ``device`` first."""
    losses, counts = [], []
    for batch in batches:
        loss, count = loss_fn(model, to_device(batch, device))
        losses.append(loss)
        counts.append(count)
    return losses, counts


@torch.no_grad()
def total_loss(model: nn.Module, batches: Sequence[Batch], loss_fn: LossFn, device: torch.device) -> float:
    """The token-weighted mean loss over all batches: sum_b N_b L_b / sum_b N_b."""
    losses, counts = batch_losses(model, batches, loss_fn, device)
    total = sum(counts)
    return float(sum(float(loss) * c for loss, c in zip(losses, counts, strict=True)) / total)


def batch_scales(counts: Sequence[int]) -> list[float]:
    """Factors B * N_b / N that make a plain mean over batches equal the token-weighted mean.

    With equal batch sizes every factor is 1. A per-batch estimate x_b of a per-token
    quantity becomes x_b * scale_b, and the plain mean of those is sum_b (N_b / N) x_b.
    """
    total = sum(counts)
    return [len(counts) * c / total for c in counts]


def check_batches(batches: Sequence[Batch]) -> None:
    """Fail early, with the fix, on an empty probe set."""
    if len(batches) == 0:
        raise ValueError("no probe batches: pass at least one batch of input_ids/attention_mask")


# --- statistics -----------------------------------------------------------------------


def mean_stderr(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and standard error of the mean (sample std with ddof=1 over sqrt(n)); None for n < 2."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_stderr: no values")
    mean = math.fsum(values) / n
    if n < 2:
        return mean, None
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


# --- flat vectors over lists of tensors -------------------------------------------------


def dot(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum over tensors of the elementwise products: the inner product of two parameter vectors."""
    return sum((x * y).sum() for x, y in zip(xs, ys, strict=True))  # type: ignore[return-value]


def norm(xs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Euclidean norm of a parameter vector given as a list of tensors."""
    return torch.sqrt(dot(xs, xs))


def flatten(xs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate tensors into one flat vector."""
    return torch.cat([x.reshape(-1) for x in xs])


def unflatten(vec: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Split a flat vector back into tensors shaped like ``like``."""
    out, start = [], 0
    for t in like:
        out.append(vec[start : start + t.numel()].view_as(t))
        start += t.numel()
    return out


def cpu_generator(seed: int) -> torch.Generator:
    """A seeded CPU generator: probes drawn from it are the same on every device."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(seed))
    return gen


def randn_like(t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Standard normal noise shaped like ``t``, drawn on the CPU, returned on t's device and dtype."""
    return torch.randn(t.shape, generator=gen, dtype=t.dtype).to(t.device)


def rademacher_like(t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """±1 entries with equal probability, shaped like ``t``, on t's device and dtype."""
    bits = torch.randint(0, 2, t.shape, generator=gen, dtype=torch.int8)
    return (bits * 2 - 1).to(device=t.device, dtype=t.dtype)


# --- parameter subsets --------------------------------------------------------------------

SUBSET_HELP = "'all', 'no_embeddings', 'layer:<i>' or 'module:<substring>' (e.g. module:mlp, module:attn)"
_LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def check_subset(subset: str) -> None:
    """Validate the form of a subset string (not whether it matches a given model)."""
    if subset in ("all", "no_embeddings"):
        return
    kind, _, arg = subset.partition(":")
    if kind == "layer" and arg.isdigit():
        return
    if kind == "module" and arg:
        return
    raise ValueError(f"unknown parameter subset {subset!r}; use {SUBSET_HELP}")


def layer_index(name: str) -> int | None:
    """The first numeric component of a parameter name: 3 in 'model.layers.3.mlp.gate.weight'."""
    match = _LAYER_INDEX.search(name)
    return int(match.group(1)) if match else None


def select_params(model: nn.Module, subset: str = "all") -> NamedParams:
    """The (name, parameter) pairs a metric differentiates or perturbs.

    - ``all``: every parameter (tied weights once).
    - ``no_embeddings``: every parameter except those of ``nn.Embedding`` modules (token
      and learned position embeddings); an output head tied to the token embedding is the
      same tensor and goes with it.
    - ``layer:<i>``: parameters whose name's first numeric component is i
      (``model.layers.i.*``, ``transformer.h.i.*``).
    - ``module:<substring>``: parameters whose name contains the substring.

    Raises ValueError for a malformed subset or one that selects nothing.
    """
    check_subset(subset)
    named = list(model.named_parameters())
    if subset == "all":
        chosen = named
    elif subset == "no_embeddings":
        embedding_ids = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
        chosen = [(n, p) for n, p in named if id(p) not in embedding_ids]
    elif subset.startswith("layer:"):
        index = int(subset.split(":", 1)[1])
        chosen = [(n, p) for n, p in named if layer_index(n) == index]
    else:
        needle = subset.split(":", 1)[1]
        chosen = [(n, p) for n, p in named if needle in n]
    if not chosen:
        layers = sorted({i for n, _ in named if (i := layer_index(n)) is not None})
        found = f"layers found: {layers[0]}-{layers[-1]}" if layers else "no numbered layers"
        example = named[0][0] if named else "none"
        raise ValueError(
            f"parameter subset {subset!r} selects no parameters of {type(model).__name__} "
            f"({found}; a parameter name looks like {example!r}); use {SUBSET_HELP}"
        )
    return chosen


# --- using a model without changing it ------------------------------------------------------


def _is_low_precision(t: torch.Tensor) -> bool:
    return t.is_floating_point() and t.dtype not in (torch.float32, torch.float64)


def _device_key(d: torch.device) -> tuple[str, int]:
    # "cuda" and "cuda:0" name the same device when the current CUDA device is 0.
    if d.index is not None:
        return d.type, d.index
    return d.type, torch.cuda.current_device() if d.type == "cuda" else 0


def _needs_copy(model: nn.Module, device: torch.device, upcast: bool) -> bool:
    for t in [*model.parameters(), *model.buffers()]:
        if _device_key(t.device) != _device_key(device):
            return True
        if upcast and _is_low_precision(t):
            return True
    return False


@contextmanager
def working_model(model: nn.Module, device: torch.device | str, *, upcast: bool = True) -> Iterator[nn.Module]:
    """The model to compute on, in eval mode, with grads enabled on every parameter.

    A model on another device, or (with ``upcast``) stored below float32, is deep-copied
    to ``device`` in float32, so the caller's model is never touched; this costs one copy
    of the weights. Otherwise the model itself is yielded, and its training flag and
    requires_grad flags are restored on exit. Metrics that write to weights restore them
    themselves (:func:`restored_params`).
    """
    device = torch.device(device)
    if _needs_copy(model, device, upcast):
        work = copy.deepcopy(model).to(device)
        if upcast and any(_is_low_precision(t) for t in [*work.parameters(), *work.buffers()]):
            work = work.float()
        work.eval()
        for p in work.parameters():
            p.requires_grad_(True)
        yield work
        return
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(True)
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def config_params(config: Any, seed: int) -> dict[str, Any]:
    """The params dict of a result: the config's fields and the seed."""
    from dataclasses import asdict

    return {**asdict(config), "seed": int(seed)}
