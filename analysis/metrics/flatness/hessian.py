"""Flatness of the loss around a checkpoint: curvature estimates and loss under weight noise.

Every function here has the same shape::

    metric(model, batches, config, *, device, seed, loss_fn=lm_loss, progress=None) -> MetricResult

and measures "the loss" of :mod:`analysis.metrics.common` (mean next-token cross-entropy
over the predicted tokens of all batches, token-weighted), in at least float32, with the
model in eval mode. ``loss_fn`` lets tests put a function with a known Hessian in place of
the language-model loss; it returns (mean loss, number of items averaged). ``progress(i, n)``,
when given, is called after each probe, iteration or noise draw (i = 1..n) so a caller can
show how far a long estimate is; the functions print nothing.

Per-token normalisation. The loss is a mean over tokens, so the Hessian of the loss is
the average of the per-token Hessians, and its trace is the per-token Hessian trace. With
several batches, the target is the Hessian of the token-weighted loss of their union,
H = sum_b (N_b / N) H_b, where N_b is the number of predicted tokens of batch b.

Standard errors. The probe batches are a sample of the data distribution, and the
population a stderr refers to is that distribution: the quantity of interest is the
curvature (or sensitivity) of the expected per-token loss, not of these particular
batches. Every probe-based metric draws its probes (Rademacher vectors, sampled labels,
weight-noise draws) for each batch separately and combines the values v[b, p] with
:func:`analysis.metrics.common.batch_clustered_mean`: the grand mean, and the standard
error of the B per-batch means (B - 1 degrees of freedom), which counts both the
batch-to-batch and the probe variation. Treating all B x P values as independent
understated it (3.4x on a 162M checkpoint; a ±2-stderr band covered the truth 48% of the
time). With a single batch the stderr covers the probe noise for that batch only, and the
result's ``stderr_covers`` says so. ``python -m bench.coverage`` checks the coverage of
the intervals (:func:`analysis.metrics.common.interval`) by simulation.

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
    Progress,
    Ticker,
    batch_clustered_mean,
    check_batches,
    check_subset,
    config_params,
    cpu_generator,
    dot,
    flatten,
    lm_logits,
    lm_loss,
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
    # Converged when the residual ||H v - lambda v|| / |lambda| of the returned pair is at most
    # tol; the eigenvalue error is then about tol^2 |lambda| / gap, far below tol itself.
    tol: float = 1e-3
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


def _clustered_result(
    name: str, values: list[list[float]], counts: list[int], config, seed: int, extra: dict
) -> MetricResult:
    """A MetricResult from probe values v[b][p] and batch token counts (see batch_clustered_mean)."""
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
            grads = _grad(loss, params, create_graph=True)
            values.append(
                hutchinson_probes(lambda v, g=grads: _hvp(g, params, v), params, config.n_probes, gen, ticker)
            )
            counts.append(count)
            del grads, loss
        n_params = sum(p.numel() for p in params)
    return _clustered_result("hessian_trace", values, counts, config, seed, {"n_params": n_params})


# --- top eigenvalue ------------------------------------------------------------------------------


@dataclass(frozen=True)
class EigenEstimate:
    """An eigenvalue from an iterative method, with its certificate.

    ``residual`` is ||H v - eigenvalue v|| / scale for the returned unit vector v (scale
    |eigenvalue| unless stated): a symmetric H has an eigenvalue within residual * scale
    of ``eigenvalue``. ``converged`` is residual <= tol; ``iterations`` counts
    operator applications (Hessian-vector products).
    """

    eigenvalue: float
    iterations: int
    residual: float
    converged: bool
    vector: Vector | None = None


def power_iteration(
    op: Callable[[Vector], Vector], start: Vector, max_iter: int, tol: float, scale: float | None = None
) -> EigenEstimate:
    """The eigenvalue of largest MAGNITUDE of the symmetric operator ``op`` (with its sign).

    Each step takes one product: lambda = v^T H v for the current unit v (the Rayleigh
    quotient), the residual ||H v - lambda v|| / scale from the same product, then
    v <- H v / ||H v||. It stops once the residual is at most ``tol``; ``scale`` is
    |lambda| unless given. A residual is a certificate, where the relative change of
    lambda between steps is not: with eigenvalues +a and -a (or a cluster of close
    ones) lambda can sit still far from any eigenvalue while v keeps rotating, and the
    residual stays large. A v in the null space (H v = 0) returns 0, converged.
    """
    size = norm(start)
    v = [x / size for x in start]
    eigenvalue, residual = 0.0, math.inf
    for iteration in range(1, max_iter + 1):
        hv = op(v)
        eigenvalue = float(dot(v, hv))
        hv_norm = float(norm(hv))
        if hv_norm == 0.0:  # H v = 0 exactly
            return EigenEstimate(0.0, iteration, 0.0, True, v)
        denominator = abs(eigenvalue) if scale is None else scale
        gap = float(norm([h - eigenvalue * x for h, x in zip(hv, v, strict=True)]))
        residual = gap / denominator if denominator > 0 else math.inf
        if residual <= tol:
            return EigenEstimate(eigenvalue, iteration, residual, True, v)
        v = [h / hv_norm for h in hv]
    return EigenEstimate(eigenvalue, max_iter, residual, False, v)


def lanczos(op: Callable[[Vector], Vector], start: Vector, max_iter: int, tol: float) -> EigenEstimate:
    """The largest ALGEBRAIC eigenvalue of the symmetric operator ``op`` by Lanczos with full
    reorthogonalisation.

    The residual of the Ritz pair (theta, y) is ||H y - theta y|| = beta_k |s_k| (s the
    eigenvector of the tridiagonal matrix), reported relative to |theta|; converged when
    it is at most ``tol``, or when the Krylov space is invariant (beta = 0). Keeps every
    Lanczos vector: max_iter copies of the selected parameters. ``vector`` is not kept.
    """
    like = start
    q = flatten(start)
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
        absolute = beta * abs(float(evecs[-1, -1]))
        residual = absolute / abs(theta) if theta != 0 else (0.0 if absolute == 0 else math.inf)
        invariant = beta <= 1e-12 * max(abs(theta), 1e-30) or k == w.numel()  # k == n: tri is H itself
        if residual <= tol or invariant:
            return EigenEstimate(theta, k, residual, True)
        betas.append(beta)
        basis.append(w / beta)
    return EigenEstimate(theta, max_iter, residual, False)


def hessian_top_eigenvalue(
    model: nn.Module,
    batches: Sequence[Batch],
    config: HessianEigenConfig | None = None,
    *,
    device: torch.device | str = "cpu",
    seed: int = 0,
    loss_fn: LossFn = lm_loss,
    progress: Progress | None = None,
) -> MetricResult:
    """The largest ALGEBRAIC eigenvalue of the Hessian of the loss over all ``batches``.

    ``method="lanczos"`` gives it directly. ``method="power"``: power iteration converges
    to the eigenvalue of largest MAGNITUDE (``extra["dominant_eigenvalue"]``). When that
    one is negative, a second run on the shifted operator H - lambda_dom I (all of whose
    eigenvalues are >= 0) finds lambda_max - lambda_dom, so the value is the largest
    algebraic eigenvalue either way. Both residuals of that case are relative to
    |lambda_dom| (the spectral norm of H) and the reported one is the larger.

    Deterministic given the batches, so ``stderr`` is None: the value is that of the
    Hessian of these batches' loss. ``iterations`` (Hessian-vector products, both phases),
    ``residual`` and ``converged`` (residual <= ``config.tol``) say whether to believe
    it: an unconverged value can be far from any eigenvalue (power iteration on a
    Hessian with eigenvalues near +a and -a sits near 0). The start vector is N(0, I)
    from ``seed``. ``progress(i, n)`` follows the Hessian-vector products, n = ``max_iter``
    (raised by a second power phase; it stops early on convergence).
    """
    config = config or HessianEigenConfig()
    check_batches(batches)
    gen = cpu_generator(seed)
    ticker = Ticker(progress, config.max_iter)
    with working_model(model, device) as work, torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
        params = [p for _, p in select_params(work, config.subset)]
        hvp = make_hvp_operator(work, params, batches, loss_fn, torch.device(device))

        def op(v: Vector) -> Vector:
            out = hvp(v)
            ticker.tick()
            return out

        start = [randn_like(p.detach(), gen) for p in params]
        extra: dict = {"method": config.method}
        if config.method == "lanczos":
            est = lanczos(op, start, config.max_iter, config.tol)
        else:
            est = power_iteration(op, start, config.max_iter, config.tol)
            dominant = est.eigenvalue
            extra["dominant_eigenvalue"] = dominant
            if dominant < 0:
                ticker.total = est.iterations + config.max_iter

                def shifted(v: Vector) -> Vector:
                    return [h - dominant * x for h, x in zip(op(v), v, strict=True)]

                restart = [randn_like(p.detach(), gen) for p in params]
                gap = power_iteration(shifted, restart, config.max_iter, config.tol, scale=abs(dominant))
                est = EigenEstimate(
                    dominant + gap.eigenvalue,
                    est.iterations + gap.iterations,
                    max(est.residual, gap.residual),
                    est.converged and gap.converged,
                )
        extra["n_params"] = sum(p.numel() for p in params)
    return MetricResult(
        name="hessian_top_eigenvalue",
        value=est.eigenvalue,
        stderr=None,
        n=1,
        per_probe=(est.eigenvalue,),
        params=config_params(config, seed),
        extra=extra,
        iterations=est.iterations,
        residual=est.residual,
        converged=est.converged,
    )


# --- Fisher trace ------------------------------------------------------------------------------


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
                grads = _grad(loss, params, retain_graph=True)
                draws.append(count * float(dot(grads, grads)))
                ticker.tick()
            values.append(draws)
            counts.append(count)
            del log_probs
    return _clustered_result("fisher_trace", values, counts, config, seed, {})


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
                base, count = loss_fn(work, batch)
                base = float(base)
                diffs = []
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
    return _clustered_result(name, values, counts, config, seed, {"loss": base_sum / sum(counts)})


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
