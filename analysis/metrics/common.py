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
# progress(i, n): a long metric has finished step i of n (probes, iterations, draws); metrics call it
# and print nothing themselves.
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class MetricResult:
    """One metric evaluated on one model.

    ``value`` is the estimate; ``stderr`` its standard error where the metric is an
    estimate (None for deterministic metrics); ``n`` the number of probes, draws or
    samples behind it; ``per_probe`` the individual values whose mean is ``value`` (or,
    where a metric says so, per-sample values); ``params`` the config fields plus the
    seed; ``extra`` vectors and diagnostics (per-layer values).

    For estimates: ``stderr_covers`` says what variation ``stderr`` accounts for
    (:data:`STDERR_NOTES`: ``"batches"`` when the probe batches are treated as a sample
    of the data distribution, ``"probes"`` when there was one batch and only the probe
    noise for that fixed batch is counted), and ``dof`` the degrees of freedom an
    interval should use (:func:`interval`). For iterative estimates (eigenvalues):
    ``iterations`` used, the final relative ``residual`` and whether it ``converged``
    (residual at most the config's tolerance); all None for direct estimates.
    """

    name: str
    value: float
    stderr: float | None
    n: int
    per_probe: tuple[float, ...] = ()
    params: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    stderr_covers: str | None = None
    dof: int | None = None
    iterations: int | None = None
    residual: float | None = None
    converged: bool | None = None


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


@dataclass
class Ticker:
    """Counts a metric's steps and reports each to an optional :data:`Progress` callback.

    ``total`` may grow while counting (a second phase of an iterative method); a report
    never says more done than total.
    """

    progress: Progress | None
    total: int
    done: int = 0

    def tick(self) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, max(self.total, self.done))


def check_batches(batches: Sequence[Batch]) -> None:
    """Fail early, with the fix, on an empty probe set."""
    if len(batches) == 0:
        raise ValueError("no probe batches: pass at least one batch of input_ids/attention_mask")


# --- statistics -----------------------------------------------------------------------

STDERR_BATCHES = "batches"
STDERR_PROBES = "probes"
STDERR_NOTES = {
    STDERR_BATCHES: "standard error over the probe batches, a sample of the data distribution: "
    "covers batch-to-batch and probe variation",
    STDERR_PROBES: "one probe batch: the standard error covers probe noise only, for that fixed batch; "
    "batch-to-batch variation is not measured (use two or more batches)",
}


def mean_stderr(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and standard error of the mean (sample std with ddof=1 over sqrt(n)); None for n < 2.

    Right only for independent values. Probe values that share a batch are not
    independent: use :func:`batch_clustered_mean` for them.
    """
    n = len(values)
    if n == 0:
        raise ValueError("mean_stderr: no values")
    mean = math.fsum(values) / n
    if n < 2:
        return mean, None
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


@dataclass(frozen=True)
class ClusteredMean:
    """A grand mean over batches of probe values, with a standard error whose unit is the batch.

    ``value`` = sum_b (N_b / N) mean_p v[b, p]; ``stderr`` and ``dof`` as described in
    :func:`batch_clustered_mean`; ``covers`` one of :data:`STDERR_NOTES`;
    ``stderr_probes_only`` the probe noise alone for these fixed batches (None when some
    batch has a single value); ``per_batch`` the batch means mean_p v[b, p];
    ``per_value`` every v[b, p] times B N_b / N, whose plain mean is ``value``.
    """

    value: float
    stderr: float | None
    dof: int | None
    covers: str
    stderr_probes_only: float | None
    per_batch: tuple[float, ...]
    per_value: tuple[float, ...]


def batch_clustered_mean(values: Sequence[Sequence[float]], counts: Sequence[int] | None = None) -> ClusteredMean:
    """Combine probe values v[b][p] (batch b, probe or draw p) of a per-token quantity.

    The batches are a sample of the data distribution and each batch's probes are drawn
    for it alone, so the batch is the sampling unit: values of one batch share its
    batch effect and are not independent. The estimate is the token-weighted grand mean
    R = sum_b (N_b / N) m_b, m_b = mean_p v[b, p] (N_b = ``counts[b]``, all 1 by default).
    Its standard error is that of the B batch means, which carry both the batch-to-batch
    and the probe variance: with z_b = (N_b / mean(N)) (m_b - R),

        stderr = sqrt(sum_b z_b^2 / (B (B - 1))),

    the linearised (cluster-robust) standard error of a ratio of sums, which is
    sd(m_b) / sqrt(B) when the batches have equal counts; ``dof`` = B - 1.

    With one batch the batch-to-batch variation cannot be seen: ``stderr`` is then the
    probe-only one, sd_p(v[0, :]) / sqrt(P) with ``dof`` = P - 1 (None for P = 1), and
    ``covers`` is ``"probes"`` so that callers say so rather than pass off a number that
    is too small for the data distribution.
    """
    n_batches = len(values)
    if n_batches == 0:
        raise ValueError("batch_clustered_mean: no batches")
    if any(len(xs) == 0 for xs in values):
        raise ValueError("batch_clustered_mean: a batch has no values")
    counts = [1] * n_batches if counts is None else list(counts)
    if len(counts) != n_batches or any(c <= 0 for c in counts):
        raise ValueError(f"batch_clustered_mean: need one positive count per batch, got {counts!r}")
    total = sum(counts)
    weights = [c / total for c in counts]  # N_b / N
    means = [math.fsum(xs) / len(xs) for xs in values]
    value = math.fsum(w * m for w, m in zip(weights, means, strict=True))
    probes_only: float | None = None  # undefined when any batch has a single value
    if all(len(xs) >= 2 for xs in values):
        probe_var = 0.0
        for xs, w, m in zip(values, weights, means, strict=True):
            probe_var += w * w * math.fsum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs)
        probes_only = math.sqrt(probe_var)
    if n_batches >= 2:
        z = [n_batches * w * (m - value) for w, m in zip(weights, means, strict=True)]
        stderr: float | None = math.sqrt(math.fsum(x * x for x in z) / (n_batches * (n_batches - 1)))
        dof: int | None = n_batches - 1
        covers = STDERR_BATCHES
    else:
        stderr = probes_only
        dof = len(values[0]) - 1 if len(values[0]) > 1 else None
        covers = STDERR_PROBES
    per_value = tuple(x * n_batches * w for xs, w in zip(values, weights, strict=True) for x in xs)
    return ClusteredMean(value, stderr, dof, covers, probes_only, tuple(means), per_value)


def quantile(level: float, dof: int | None) -> float:
    """The two-sided multiplier of a ``level`` interval: Student's t with ``dof`` degrees of
    freedom, or the normal one when ``dof`` is None (a large-sample stderr).

    With few batches the normal 1.96 undercovers badly (about 0.70 at 2 batches, 0.86 at
    4; see ``python -m bench.coverage``), so estimates that are means of B batch means
    use t with B - 1 degrees of freedom.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"interval level must be between 0 and 1, got {level!r}")
    if dof is None:
        from statistics import NormalDist

        return NormalDist().inv_cdf(0.5 + level / 2)
    if dof < 1:
        raise ValueError(f"interval needs at least 1 degree of freedom, got {dof!r}")
    from scipy.stats import t

    return float(t.ppf(0.5 + level / 2, dof))


def interval(estimate: float, stderr: float, dof: int | None, level: float = 0.95) -> tuple[float, float]:
    """The ``level`` confidence interval estimate ± q * stderr, q from :func:`quantile`.

    The stored stderr is the plain standard error; this is the one place where it
    becomes an interval.
    """
    q = quantile(level, dof)
    return estimate - q * stderr, estimate + q * stderr


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


def check_positive_int(owner: str, name: str, value: int) -> None:
    """Raise ValueError naming ``owner``'s setting ``name`` unless ``value`` is an integer >= 1 (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}: {name} must be a positive integer, got {value!r}")


def check_positive_number(owner: str, name: str, value: float) -> None:
    """Raise ValueError naming ``owner``'s setting ``name`` unless ``value`` is a finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{owner}: {name} must be a positive number, got {value!r}")


def check_non_negative_number(owner: str, name: str, value: float) -> None:
    """Raise ValueError naming ``owner``'s setting ``name`` unless ``value`` is a finite number >= 0."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{owner}: {name} must be a number >= 0, got {value!r}")


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


def clustered_result(
    name: str, values: list[list[float]], counts: list[int], config: Any, seed: int, extra: dict[str, Any]
) -> MetricResult:
    """A MetricResult from probe values v[b][p] and batch token counts (see :func:`batch_clustered_mean`)."""
    est = batch_clustered_mean(values, counts)
    return MetricResult(
        name=name,
        value=est.value,
        stderr=est.stderr,
        n=len(est.per_value),
        per_probe=est.per_value,
        params=config_params(config, seed),
        extra={
            "stderr_probes_only": est.stderr_probes_only,
            "per_batch": est.per_batch,
            "n_batches": len(values),
            "n_tokens": sum(counts),
            **extra,
        },
        stderr_covers=est.covers,
        dof=est.dof,
    )
