"""Flatness of the loss around a checkpoint: curvature estimates and loss under weight noise.

Every function here has the same shape::

    metric(model, batches, config, *, device, seed, loss_fn=lm_loss) -> MetricResult

and measures "the loss" of :mod:`analysis.metrics.common` (mean next-token cross-entropy
over the predicted tokens of all batches, token-weighted), in at least float32, with the
model in eval mode. ``loss_fn`` lets tests put a function with a known Hessian in place of
the language-model loss; it returns (mean loss, number of items averaged).

Per-token normalisation. The loss is a mean over tokens, so the Hessian of the loss is
the average of the per-token Hessians, and its trace is the per-token Hessian trace. With
several batches, the target is the Hessian of the token-weighted loss of their union,
H = sum_b (N_b / N) H_b, where N_b is the number of predicted tokens of batch b.

Second derivatives run inside ``sdpa_kernel(SDPBackend.MATH)``: torch has no double
backward for the fused CPU attention kernels, and the math kernel is faster here than
reloading with ``attn_implementation="eager"`` (which also works).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from analysis.metrics.common import (
    Batch,
    LossFn,
    MetricResult,
    batch_scales,
    check_batches,
    check_subset,
    config_params,
    cpu_generator,
    dot,
    flatten,
    lm_logits,
    lm_loss,
    mean_stderr,
    norm,
    prediction_mask,
    rademacher_like,
    randn_like,
    select_params,
    to_device,
    total_loss,
    unflatten,
    working_model,
)

Vector = list[torch.Tensor]  # a parameter-space vector, one tensor per selected parameter


# --- config -------------------------------------------------------------------------------


def _positive_int(owner: str, name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}: {name} must be a positive integer, got {value!r}")


def _positive_float(owner: str, name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{owner}: {name} must be a positive number, got {value!r}")


def _non_negative_float(owner: str, name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{owner}: {name} must be a number >= 0, got {value!r}")


@dataclass(frozen=True)
class HessianTraceConfig:
    """Hutchinson's estimator: ``n_probes`` Rademacher probes for each batch."""

    n_probes: int = 16  # probes per batch; the estimate uses n_probes * len(batches) values
    subset: str = "all"  # which parameters: see common.select_params

    def __post_init__(self) -> None:
        _positive_int("hessian_trace", "n_probes", self.n_probes)
        check_subset(self.subset)


@dataclass(frozen=True)
class HessianEigenConfig:
    """The largest (algebraic) Hessian eigenvalue by power iteration or Lanczos."""

    max_iter: int = 100  # Hessian-vector products at most (per phase for power iteration)
    tol: float = 1e-4  # relative: change of the estimate (power) or Ritz residual (lanczos)
    subset: str = "all"
    method: str = "power"  # "power": two vectors of memory; "lanczos": max_iter vectors, far fewer steps

    def __post_init__(self) -> None:
        _positive_int("hessian_top_eigenvalue", "max_iter", self.max_iter)
        _positive_float("hessian_top_eigenvalue", "tol", self.tol)
        check_subset(self.subset)
        if self.method not in ("power", "lanczos"):
            raise ValueError(f"hessian_top_eigenvalue: method must be 'power' or 'lanczos', got {self.method!r}")


@dataclass(frozen=True)
class FisherTraceConfig:
    """Fisher trace from labels sampled from the model: ``n_samples`` label draws per batch."""

    n_samples: int = 4
    subset: str = "all"

    def __post_init__(self) -> None:
        _positive_int("fisher_trace", "n_samples", self.n_samples)
        check_subset(self.subset)


@dataclass(frozen=True)
class AdaptiveSharpnessConfig:
    """E[L(w + d)] - L(w) with d ~ N(0, (rho * |w|)^2) elementwise, over ``n_samples`` draws."""

    rho: float = 0.01
    n_samples: int = 8
    subset: str = "all"

    def __post_init__(self) -> None:
        _non_negative_float("adaptive_sharpness", "rho", self.rho)
        _positive_int("adaptive_sharpness", "n_samples", self.n_samples)
        check_subset(self.subset)


@dataclass(frozen=True)
class PerturbationConfig:
    """Loss increase under noise of relative size ``sigma``: per tensor, std = sigma * RMS(W)."""

    sigma: float = 0.01
    n_samples: int = 8
    subset: str = "all"

    def __post_init__(self) -> None:
        _non_negative_float("perturbation_sensitivity", "sigma", self.sigma)
        _positive_int("perturbation_sensitivity", "n_samples", self.n_samples)
        check_subset(self.subset)


@dataclass(frozen=True)
class SamConfig:
    """One-step SAM sharpness, or ASAM with ``adaptive`` (ascent scaled by |w|)."""

    rho: float = 0.05
    adaptive: bool = False
    subset: str = "all"

    def __post_init__(self) -> None:
        _non_negative_float("sam_sharpness", "rho", self.rho)
        if not isinstance(self.adaptive, bool):
            raise ValueError(f"sam_sharpness: adaptive must be true or false, got {self.adaptive!r}")
        check_subset(self.subset)


# --- derivatives --------------------------------------------------------------------------


def _grad(output: torch.Tensor, params: Sequence[torch.Tensor], **kwargs) -> Vector:
    # allow_unused: experts no token was routed to have no gradient; they count as zeros.
    return list(torch.autograd.grad(output, params, allow_unused=True, materialize_grads=True, **kwargs))


def _hvp(grads: Vector, params: Sequence[torch.Tensor], v: Vector) -> Vector:
    """H v = d(g . v)/dw by double backward, from gradients built with create_graph=True."""
    gv = dot(grads, v)
    if not gv.requires_grad:  # the gradient does not depend on the weights: H = 0 here
        return [torch.zeros_like(p) for p in params]
    return _grad(gv, params, retain_graph=True)


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
        cached.append((_grad(loss, params, create_graph=True), count))

    def apply(v: Vector) -> Vector:
        total = [torch.zeros_like(p) for p in params]
        n_total = 0
        for batch in batches if not cached else []:
            loss, count = loss_fn(model, to_device(batch, device))
            grads = _grad(loss, params, create_graph=True)
            for acc, h in zip(total, _hvp(grads, params, v), strict=True):
                acc.add_(h.detach(), alpha=count)
            n_total += count
            del grads
        for grads, count in cached:
            for acc, h in zip(total, _hvp(grads, params, v), strict=True):
                acc.add_(h.detach(), alpha=count)
            n_total += count
        return [acc / n_total for acc in total]

    return apply


def _stratified(values: list[list[float]], counts: list[int]) -> tuple[tuple[float, ...], float, float | None, float]:
    """Combine per-batch estimates x_{b,p} of a per-token quantity.

    Returns (per-probe values rescaled by B N_b / N, their mean, the standard error over
    (probe, batch) values, the probe-only standard error). The mean equals
    sum_b (N_b / N) mean_p x_{b,p}: unbiased for the token-weighted target. The first
    standard error treats every (probe, batch) value as one draw, so it also counts
    batch-to-batch variation (the batches as a sample of text); the probe-only one,
    sqrt(sum_b (N_b/N)^2 s_b^2 / P_b), is the Monte-Carlo error for these fixed batches.
    """
    total = sum(counts)
    scales = batch_scales(counts)
    per_probe = tuple(x * s for xs, s in zip(values, scales, strict=True) for x in xs)
    mean, stderr = mean_stderr(per_probe)
    var_fixed = 0.0
    for xs, c in zip(values, counts, strict=True):
        if len(xs) > 1:
            m = math.fsum(xs) / len(xs)
            s2 = math.fsum((x - m) ** 2 for x in xs) / (len(xs) - 1)
            var_fixed += (c / total) ** 2 * s2 / len(xs)
    return per_probe, mean, stderr, math.sqrt(var_fixed)


# --- Hessian trace -----------------------------------------------------------------------------


def hessian_trace(
    model: nn.Module,
    batches: Sequence[Batch],
    config: HessianTraceConfig | None = None,
    *,
    device: torch.device | str = "cpu",
    seed: int = 0,
    loss_fn: LossFn = lm_loss,
) -> MetricResult:
    """Per-token Hessian trace by Hutchinson's estimator with Rademacher probes.

    For each batch b and probe v (entries ±1), v^T H_b v is an unbiased estimate of
    tr(H_b), H_b the Hessian of batch b's mean loss over the selected parameters; the
    value is the token-weighted mean over batches (see ``_stratified``), i.e. the trace of
    the Hessian of the mean-per-token loss. ``stderr`` is over (probe, batch) values;
    ``extra["stderr_probes_only"]`` is the error due to the probes alone.
    """
    config = config or HessianTraceConfig()
    check_batches(batches)
    gen = cpu_generator(seed)
    values: list[list[float]] = []
    counts: list[int] = []
    with working_model(model, device) as work, torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
        params = [p for _, p in select_params(work, config.subset)]
        for batch in batches:
            loss, count = loss_fn(work, to_device(batch, device))
            grads = _grad(loss, params, create_graph=True)
            quads = []
            for _ in range(config.n_probes):
                v = [rademacher_like(p, gen) for p in params]
                quads.append(float(dot(v, _hvp(grads, params, v))))
            values.append(quads)
            counts.append(count)
            del grads, loss
        n_params = sum(p.numel() for p in params)
    per_probe, mean, stderr, stderr_fixed = _stratified(values, counts)
    return MetricResult(
        name="hessian_trace",
        value=mean,
        stderr=stderr,
        n=len(per_probe),
        per_probe=per_probe,
        params=config_params(config, seed),
        extra={
            "stderr_probes_only": stderr_fixed,
            "per_batch": tuple(math.fsum(xs) / len(xs) for xs in values),
            "n_tokens": sum(counts),
            "n_params": n_params,
        },
    )


# --- top eigenvalue ------------------------------------------------------------------------------


def _power_iteration(
    op: Callable[[Vector], Vector], v: Vector, max_iter: int, tol: float
) -> tuple[float, Vector, int, bool]:
    """Dominant eigenvalue (largest |lambda|, with its sign) by power iteration.

    Returns (eigenvalue, eigenvector, iterations, converged). The eigenvalue is the
    Rayleigh quotient v^T H v of a unit v; convergence is a relative change below tol.
    """
    scale = norm(v)
    v = [x / scale for x in v]
    previous: float | None = None
    eigenvalue = 0.0
    for iteration in range(1, max_iter + 1):
        hv = op(v)
        eigenvalue = float(dot(v, hv))
        size = norm(hv)
        if float(size) == 0.0:  # v is in the null space: H v = 0 exactly
            return 0.0, v, iteration, True
        v = [x / size for x in hv]
        if previous is not None and abs(eigenvalue - previous) <= tol * abs(eigenvalue):
            return eigenvalue, v, iteration, True
        previous = eigenvalue
    return eigenvalue, v, max_iter, False


def _lanczos(
    op: Callable[[Vector], Vector], v: Vector, like: Sequence[torch.Tensor], max_iter: int, tol: float
) -> tuple[float, int, bool, float]:
    """Largest algebraic eigenvalue by Lanczos with full reorthogonalisation.

    Returns (eigenvalue, iterations, converged, residual). Converged when the Ritz
    residual ||H y - theta y|| = beta_k |s_k| is at most tol * |theta|, which bounds the
    distance from theta to an eigenvalue of H. Keeps every Lanczos vector: max_iter
    copies of the selected parameters.
    """
    q = flatten(v)
    q = q / torch.linalg.vector_norm(q)
    basis = [q]
    alphas: list[float] = []
    betas: list[float] = []
    theta, residual = 0.0, math.inf
    for k in range(1, max_iter + 1):
        w = flatten(op(unflatten(basis[-1], like)))
        alphas.append(float(torch.dot(basis[-1], w)))
        stacked = torch.stack(basis)  # (k, n)
        for _ in range(2):  # twice is enough to keep the basis orthogonal in floating point
            w = w - (stacked @ w) @ stacked
        del stacked
        beta = float(torch.linalg.vector_norm(w))
        tri = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if len(betas):
            off = torch.tensor(betas, dtype=torch.float64)
            tri = tri + torch.diag(off, 1) + torch.diag(off, -1)
        evals, evecs = torch.linalg.eigh(tri)
        theta = float(evals[-1])
        residual = beta * abs(float(evecs[-1, -1]))
        if residual <= tol * abs(theta) or beta <= 1e-12 * max(abs(theta), 1e-30):
            return theta, k, True, residual
        if k == w.numel():  # a full basis: the tridiagonal matrix is H itself
            return theta, k, True, residual
        betas.append(beta)
        basis.append(w / beta)
    return theta, max_iter, False, residual


def hessian_top_eigenvalue(
    model: nn.Module,
    batches: Sequence[Batch],
    config: HessianEigenConfig | None = None,
    *,
    device: torch.device | str = "cpu",
    seed: int = 0,
    loss_fn: LossFn = lm_loss,
) -> MetricResult:
    """The largest algebraic eigenvalue of the Hessian of the loss over all ``batches``.

    Power iteration converges to the eigenvalue of largest magnitude. When that one is
    negative, a second run on the shifted operator H - lambda_dom I (all of whose
    eigenvalues are >= 0) finds lambda_max - lambda_dom, so the value is always the
    largest algebraic eigenvalue; ``extra["dominant_eigenvalue"]`` keeps the first run's
    result. Lanczos gives the largest algebraic eigenvalue directly. The start vector is
    N(0, I) from ``seed``. ``extra`` has iterations (Hessian-vector products) and converged.
    """
    config = config or HessianEigenConfig()
    check_batches(batches)
    gen = cpu_generator(seed)
    with working_model(model, device) as work, torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
        params = [p for _, p in select_params(work, config.subset)]
        op = make_hvp_operator(work, params, batches, loss_fn, torch.device(device))
        start = [randn_like(p.detach(), gen) for p in params]
        extra: dict = {"method": config.method}
        if config.method == "lanczos":
            value, iterations, converged, residual = _lanczos(op, start, params, config.max_iter, config.tol)
            extra["residual"] = residual
        else:
            dominant, _, iterations, converged = _power_iteration(op, start, config.max_iter, config.tol)
            value = dominant
            extra["dominant_eigenvalue"] = dominant
            if dominant < 0:

                def shifted(v: Vector) -> Vector:
                    return [h - dominant * x for h, x in zip(op(v), v, strict=True)]

                restart = [randn_like(p.detach(), gen) for p in params]
                gap, _, more, converged_2 = _power_iteration(shifted, restart, config.max_iter, config.tol)
                value = dominant + gap
                iterations += more
                converged = converged and converged_2
        extra.update(iterations=iterations, converged=converged, n_params=sum(p.numel() for p in params))
    return MetricResult(
        name="hessian_top_eigenvalue",
        value=value,
        stderr=None,
        n=1,
        per_probe=(value,),
        params=config_params(config, seed),
        extra=extra,
    )


# --- Fisher trace ------------------------------------------------------------------------------


def fisher_trace(
    model: nn.Module,
    batches: Sequence[Batch],
    config: FisherTraceConfig | None = None,
    *,
    device: torch.device | str = "cpu",
    seed: int = 0,
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
    """
    config = config or FisherTraceConfig()
    check_batches(batches)
    gen = cpu_generator(seed)
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
                grads = _grad(loss, params, retain_graph=True)
                draws.append(count * float(dot(grads, grads)))
            values.append(draws)
            counts.append(count)
            del log_probs
    per_probe, mean, stderr, stderr_fixed = _stratified(values, counts)
    return MetricResult(
        name="fisher_trace",
        value=mean,
        stderr=stderr,
        n=len(per_probe),
        per_probe=per_probe,
        params=config_params(config, seed),
        extra={"stderr_probes_only": stderr_fixed, "n_tokens": sum(counts)},
    )


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
) -> MetricResult:
    """Mean and stderr over draws of L(w + d) - L(w), weights written back bitwise after."""
    check_batches(batches)
    gen = cpu_generator(seed)
    device = torch.device(device)
    with working_model(model, device) as work, torch.no_grad():
        params = [p for _, p in select_params(work, config.subset)]
        saved = [p.detach().clone() for p in params]
        try:
            base = total_loss(work, batches, loss_fn, device)
            diffs = []
            for _ in range(config.n_samples):
                for p, w in zip(params, saved, strict=True):
                    p.copy_(w + noise(w, gen))
                diffs.append(total_loss(work, batches, loss_fn, device) - base)
        finally:
            for p, w in zip(params, saved, strict=True):
                p.copy_(w)
    mean, stderr = mean_stderr(diffs)
    return MetricResult(
        name=name,
        value=mean,
        stderr=stderr,
        n=len(diffs),
        per_probe=tuple(diffs),
        params=config_params(config, seed),
        extra={"loss": base},
    )


def adaptive_sharpness(
    model: nn.Module,
    batches: Sequence[Batch],
    config: AdaptiveSharpnessConfig | None = None,
    *,
    device: torch.device | str = "cpu",
    seed: int = 0,
    loss_fn: LossFn = lm_loss,
) -> MetricResult:
    """Average-case adaptive sharpness E[L(w + d)] - L(w), d ~ N(0, (rho |w|)^2) elementwise.

    The noise on each weight is proportional to its magnitude, which makes the measure
    invariant to rescalings of layers that leave the function unchanged.
    """
    config = config or AdaptiveSharpnessConfig()

    def noise(w: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return config.rho * w.abs() * randn_like(w, gen)

    return _noise_sharpness("adaptive_sharpness", model, batches, config, noise, device, seed, loss_fn)


def perturbation_sensitivity(
    model: nn.Module,
    batches: Sequence[Batch],
    config: PerturbationConfig | None = None,
    *,
    device: torch.device | str = "cpu",
    seed: int = 0,
    loss_fn: LossFn = lm_loss,
) -> MetricResult:
    """Loss increase under Gaussian weight noise of fixed relative size, mean over draws.

    Each tensor W gets d = sigma * ||W||_F / sqrt(numel(W)) * N(0, I): noise whose size
    relative to the tensor's RMS weight is the same for every tensor and checkpoint, so a
    rise across checkpoints means the weights became more sensitive, not bigger.
    """
    config = config or PerturbationConfig()

    def noise(w: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        rms = torch.linalg.vector_norm(w) / math.sqrt(w.numel())
        return config.sigma * rms * randn_like(w, gen)

    return _noise_sharpness("perturbation_sensitivity", model, batches, config, noise, device, seed, loss_fn)


# --- SAM ---------------------------------------------------------------------------------------


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
    g is the gradient of the token-weighted loss over all batches. Deterministic, so
    ``stderr`` is None; ``seed`` is recorded only. A zero gradient gives 0.
    """
    config = config or SamConfig()
    check_batches(batches)
    device = torch.device(device)
    with working_model(model, device) as work:
        params = [p for _, p in select_params(work, config.subset)]
        grads = [torch.zeros_like(p) for p in params]
        loss_sum, n_total = 0.0, 0
        with torch.enable_grad():
            for batch in batches:
                loss, count = loss_fn(work, to_device(batch, device))
                for acc, g in zip(grads, _grad(loss, params), strict=True):
                    acc.add_(g, alpha=count)
                loss_sum += float(loss.detach()) * count
                n_total += count
        grads = [g / n_total for g in grads]
        base = loss_sum / n_total
        with torch.no_grad():
            if config.adaptive:
                scales = [p.detach().abs() for p in params]
                direction = [t * t * g for t, g in zip(scales, grads, strict=True)]
                size = norm([t * g for t, g in zip(scales, grads, strict=True)])
            else:
                direction, size = grads, norm(grads)
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
