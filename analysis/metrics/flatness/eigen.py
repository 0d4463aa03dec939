"""The largest Hessian eigenvalue: power iteration and Lanczos on Hessian-vector products.

Both iterations are generic (any symmetric operator on parameter-space vectors) and return an
:class:`EigenEstimate` whose residual certifies the value; :func:`hessian_top_eigenvalue` runs
them on the Hessian of the loss (see :mod:`analysis.metrics.flatness`).
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
    check_batches,
    check_positive_int,
    check_positive_number,
    check_subset,
    config_params,
    cpu_generator,
    dot,
    flatten,
    lm_loss,
    norm,
    randn_like,
    select_params,
    unflatten,
    working_model,
)
from analysis.metrics.flatness.hessian import Vector, make_hvp_operator


@dataclass(frozen=True)
class HessianEigenConfig:
    """The largest (algebraic) Hessian eigenvalue by power iteration or Lanczos."""

    # Hessian-vector products at most (per phase for power iteration). Kept at 100 although one product costs
    # ~4.7 min at Pythia-160m size on a 2-core CPU (README, Benchmarks): fewer would not make it practical
    # there, only leave it unconverged more often; on a CPU at that size use a GPU or a parameter subset.
    max_iter: int = 100
    # Converged when the residual ||H v - lambda v|| / |lambda| of the returned pair is at most
    # tol; the eigenvalue error is then about tol^2 |lambda| / gap, far below tol itself.
    tol: float = 1e-3
    subset: str = "all"
    method: str = "power"  # "power": two vectors of memory; "lanczos": max_iter vectors, far fewer steps

    def __post_init__(self) -> None:
        check_positive_int("hessian_top_eigenvalue", "max_iter", self.max_iter)
        check_positive_number("hessian_top_eigenvalue", "tol", self.tol)
        check_subset(self.subset)
        if self.method not in ("power", "lanczos"):
            raise ValueError(f"hessian_top_eigenvalue: method must be 'power' or 'lanczos', got {self.method!r}")


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


def _largest_by_power(
    op: Callable[[Vector], Vector],
    start: Vector,
    like: Sequence[torch.Tensor],
    gen: torch.Generator,
    config: HessianEigenConfig,
    ticker: Ticker,
) -> tuple[EigenEstimate, float]:
    """The largest algebraic eigenvalue of ``op`` by power iteration, and the dominant one found first.

    A negative dominant eigenvalue lambda_dom starts a second run, from a fresh N(0, I) vector
    drawn from ``gen``, on H - lambda_dom I, whose eigenvalues are all >= 0 and whose dominant
    one is therefore lambda_max - lambda_dom; its residual is relative to |lambda_dom|.
    """
    est = power_iteration(op, start, config.max_iter, config.tol)
    dominant = est.eigenvalue
    if dominant < 0:
        ticker.total = est.iterations + config.max_iter

        def shifted(v: Vector) -> Vector:
            return [h - dominant * x for h, x in zip(op(v), v, strict=True)]

        restart = [randn_like(p.detach(), gen) for p in like]
        gap = power_iteration(shifted, restart, config.max_iter, config.tol, scale=abs(dominant))
        est = EigenEstimate(
            dominant + gap.eigenvalue,
            est.iterations + gap.iterations,
            max(est.residual, gap.residual),
            est.converged and gap.converged,
        )
    return est, dominant


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
            est, dominant = _largest_by_power(op, start, params, gen, config, ticker)
            extra["dominant_eigenvalue"] = dominant
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
