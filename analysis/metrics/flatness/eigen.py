"""The largest Hessian eigenvalue: Lanczos and power iteration on Hessian-vector products.

Both iterations are generic (any symmetric operator on parameter-space vectors) and return an
:class:`EigenEstimate` whose residual certifies the value; :func:`hessian_top_eigenvalue` runs
them on the Hessian of the loss (see :mod:`analysis.metrics.flatness`). Lanczos keeps its whole
basis only while it fits ``HessianEigenConfig.basis_mb``; ``python -m bench.eigen_convergence``
measures what each method needs.
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
    check_non_negative_number,
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
    """The largest (algebraic) Hessian eigenvalue by Lanczos (memory-aware) or power iteration."""

    # Hessian-vector products at most (per phase for power iteration). Measured (python -m bench.eigen_convergence:
    # 16 demo checkpoints and 12 starts on tiny models with an exact Hessian): Lanczos reached tol 1e-3 in a
    # median of 11 products and at most 23 (power iteration: median 60, up to 1,120); 40 is 1.5x that worst
    # case rounded up to ten, so a model converging more slowly still converges. A product costs ~4.7 min at
    # Pythia-160m size on a 2-core CPU (README, Benchmarks): ~50 min typical there, 3.1 h at the cap.
    max_iter: int = 40
    # Converged when the residual ||H v - lambda v|| / |lambda| of the returned pair is at most
    # tol; the eigenvalue error is then about tol^2 |lambda| / gap, far below tol itself. Measured:
    # 1e-2 would save Lanczos 1-3 products (median 9.5 against 11) for a certified error ten times looser.
    tol: float = 1e-3
    subset: str = "all"
    # "lanczos": the largest eigenvalue directly, in about a fifth of the products; "power": power iteration
    # (two vectors; a second, shifted phase when the dominant eigenvalue is negative, which on 3 of the 16 demo
    # checkpoints stopped in the bulk of the spectrum near 0, certified as an eigenvalue but not the largest).
    method: str = "lanczos"
    # MiB Lanczos may keep for its basis: full reorthogonalisation while max_iter vectors of the selected
    # parameters fit (a 1.7M-parameter model at max_iter 40: 272 MiB), else the three-term recurrence,
    # which keeps three vectors (162M parameters: 648 MiB each in fp32). 0 always takes the recurrence.
    basis_mb: float = 1024.0

    def __post_init__(self) -> None:
        check_positive_int("hessian_top_eigenvalue", "max_iter", self.max_iter)
        check_positive_number("hessian_top_eigenvalue", "tol", self.tol)
        check_subset(self.subset)
        if self.method not in ("power", "lanczos"):
            raise ValueError(f"hessian_top_eigenvalue: method must be 'power' or 'lanczos', got {self.method!r}")
        check_non_negative_number("hessian_top_eigenvalue", "basis_mb", self.basis_mb)


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


def lanczos(
    op: Callable[[Vector], Vector], start: Vector, max_iter: int, tol: float, *, reorthogonalize: bool = True
) -> EigenEstimate:
    """The largest ALGEBRAIC eigenvalue of the symmetric operator ``op`` by Lanczos.

    The residual of the Ritz pair (theta, y) is ||H y - theta y|| = beta_k |s_k| (s the
    eigenvector of the tridiagonal matrix), reported relative to |theta|; converged when
    it is at most ``tol``, or when the Krylov space is invariant (beta = 0).

    ``reorthogonalize=True`` keeps every Lanczos vector (max_iter copies of the selected
    parameters, allocated once) and orthogonalises each new one against all of them, twice.
    ``reorthogonalize=False`` runs the plain three-term recurrence, which holds three vectors:
    in floating point its basis loses orthogonality once a Ritz value converges, and what that
    costs is extra ("ghost") copies of converged eigenvalues, not a wrong largest one. The
    residual bound above still holds for every Ritz pair up to rounding of order
    eps * ||H|| (Paige, 1976-1980), so the certificate is the same in both modes.
    ``vector`` is not kept.
    """
    like = start
    q = flatten(start)
    q = q / torch.linalg.vector_norm(q)
    n = q.numel()
    # (max_iter, n), filled row by row: untouched rows of a large CPU allocation take no memory.
    basis = torch.empty((max_iter, n), dtype=q.dtype, device=q.device) if reorthogonalize else None
    q_prev: torch.Tensor | None = None
    alphas: list[float] = []
    betas: list[float] = []
    theta, residual = 0.0, math.inf
    for k in range(1, max_iter + 1):
        w = flatten(op(unflatten(q, like)))
        if basis is not None:
            basis[k - 1] = q
            alphas.append(float(torch.dot(q, w)))
            done = basis[:k]  # (k, n)
            for _ in range(2):  # twice is enough to keep the basis orthogonal in floating point
                w = w - (done @ w) @ done
        else:
            # Paige's ordering (subtract the older vector before taking alpha) is the stable one. In place:
            # w is this step's own tensor, and at 162M parameters every temporary vector is 648 MB.
            if q_prev is not None:
                w.add_(q_prev, alpha=-betas[-1])
            alphas.append(float(torch.dot(q, w)))
            w.add_(q, alpha=-alphas[-1])
        beta = float(torch.linalg.vector_norm(w))
        tri = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if len(betas):
            off = torch.tensor(betas, dtype=torch.float64)
            tri = tri + torch.diag(off, 1) + torch.diag(off, -1)
        evals, evecs = torch.linalg.eigh(tri)
        theta = float(evals[-1])
        absolute = beta * abs(float(evecs[-1, -1]))
        residual = absolute / abs(theta) if theta != 0 else (0.0 if absolute == 0 else math.inf)
        # k == n with a kept basis: tri is H itself. Without one, k can pass n (ghosts) and says nothing.
        invariant = beta <= 1e-12 * max(abs(theta), 1e-30) or (basis is not None and k == n)
        if residual <= tol or invariant:
            return EigenEstimate(theta, k, residual, True)
        betas.append(beta)
        q_prev, q = q, w.div_(beta)
    return EigenEstimate(theta, max_iter, residual, False)


def lanczos_basis_mb(n_params: int, max_iter: int, itemsize: int) -> float:
    """MiB that Lanczos with full reorthogonalisation keeps: ``max_iter`` vectors of ``n_params`` values."""
    return max_iter * n_params * itemsize / 2**20


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

    ``method="lanczos"`` (the default) gives it directly, with full reorthogonalisation when
    ``max_iter`` vectors of the selected parameters fit ``basis_mb`` MiB, else by the three-term
    recurrence; ``extra["reorthogonalisation"]`` says which ("full" or "none") and
    ``extra["basis_mb_needed"]`` what the full basis would take. ``method="power"``: power iteration converges
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
        n_params = sum(p.numel() for p in params)
        extra: dict = {"method": config.method, "n_params": n_params}
        if config.method == "lanczos":
            needed = lanczos_basis_mb(n_params, config.max_iter, max(p.element_size() for p in params))
            full = needed <= config.basis_mb
            extra |= {"reorthogonalisation": "full" if full else "none", "basis_mb_needed": needed}
            est = lanczos(op, start, config.max_iter, config.tol, reorthogonalize=full)
        else:
            est, dominant = _largest_by_power(op, start, params, gen, config, ticker)
            extra["dominant_eigenvalue"] = dominant
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
