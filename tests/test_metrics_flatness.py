"""Flatness metrics against exact oracles: a quadratic with a known Hessian, and the exact
float64 Hessian of a tiny OLMoE."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from analysis.metrics.common import (
    batch_clustered_mean,
    cpu_generator,
    interval,
    lm_loss,
    mean_stderr,
    quantile,
    select_params,
    to_device,
)
from analysis.metrics.flatness import (
    AdaptiveSharpnessConfig,
    FisherTraceConfig,
    HessianEigenConfig,
    HessianTraceConfig,
    PerturbationConfig,
    SamConfig,
    adaptive_sharpness,
    fisher_trace,
    hessian_top_eigenvalue,
    hessian_trace,
    hutchinson_probes,
    lanczos,
    perturbation_sensitivity,
    power_iteration,
    sam_sharpness,
)
from analysis.models import tiny_moe_config

VOCAB = 12


# Tiny tensors: one intra-op thread (the fixture in conftest.py says why).
pytestmark = pytest.mark.usefixtures("one_thread")


# --- a quadratic: L(w) = 0.5 w^T A w, so H = A ----------------------------------------------


class Quadratic(nn.Module):
    def __init__(self, a: torch.Tensor, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(a.shape[0], generator=gen, dtype=a.dtype))
        self.register_buffer("a", a)


def quadratic_loss(model: nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
    return 0.5 * model.w @ model.a @ model.w, 1


def symmetric(eigenvalues: torch.Tensor, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=gen, dtype=torch.float64))
    return q @ torch.diag(eigenvalues) @ q.T


def test_hutchinson_on_quadratic_is_within_three_stderr_and_stderr_is_right(device):
    a = symmetric(torch.linspace(-1.0, 5.0, 20, dtype=torch.float64))
    model = Quadratic(a)
    # 64 identical batches x 4 probes = 256 Rademacher probes: no batch-to-batch variation, so
    # the stderr over the 64 batch means estimates the probe noise alone (63 dof).
    config = HessianTraceConfig(n_probes=4)
    result = hessian_trace(model, [{}] * 64, config, seed=1, loss_fn=quadratic_loss, device=device)
    exact = float(torch.trace(a))
    assert result.n == 256 and len(result.per_probe) == 256
    assert result.stderr_covers == "batches" and result.dof == 63 and result.extra["n_batches"] == 64
    assert abs(result.value - exact) < 3 * result.stderr
    # Var(v^T A v) = 2 * sum_{i != j} A_ij^2 for Rademacher v.
    off = a - torch.diag(torch.diag(a))
    expected_stderr = math.sqrt(2 * float((off**2).sum()) / 256)
    assert 0.8 < result.extra["stderr_probes_only"] / expected_stderr < 1.25
    assert 0.7 < result.stderr / expected_stderr < 1.3  # sd of a 63-dof estimate: about 0.09


def batch_quadratic_loss(model: nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
    """0.5 (w - c)^T A_b (w - c) with the batch's own matrix (c = 0 unless the batch has a
    ``center``), averaged over the batch's ``count`` items."""
    x = model.w - batch["center"] if "center" in batch else model.w
    return 0.5 * x @ batch["hessian"] @ x, int(batch["count"])


def test_hessian_trace_is_the_pure_estimator_on_batch_hessians():
    # The metric on a model whose batches carry their Hessians = hutchinson_probes on the
    # matrices + batch_clustered_mean: what bench.coverage simulates is what the metric does.
    mats = [symmetric(torch.linspace(0.0, 2.0 + b, 6, dtype=torch.float64), seed=b) for b in range(3)]
    counts = [5, 9, 7]
    batches = [{"hessian": m, "count": torch.tensor(c)} for m, c in zip(mats, counts, strict=True)]
    model = Quadratic(mats[0])
    result = hessian_trace(model, batches, HessianTraceConfig(n_probes=5), seed=2, loss_fn=batch_quadratic_loss)
    probe_gen = cpu_generator(2)
    values = [hutchinson_probes(lambda v, m=m: [m @ v[0]], [model.w], 5, probe_gen) for m in mats]
    est = batch_clustered_mean(values, counts)
    assert result.value == pytest.approx(est.value, rel=1e-12)
    assert result.stderr == pytest.approx(est.stderr, rel=1e-12)
    assert result.per_probe == pytest.approx(est.per_value, rel=1e-12)
    assert result.dof == 2 and result.stderr_covers == "batches"
    # The token-weighted target: sum_b (N_b / N) tr(A_b).
    target = sum(c * float(torch.trace(m)) for c, m in zip(counts, mats, strict=True)) / sum(counts)
    assert result.value == pytest.approx(target, abs=6 * result.extra["stderr_probes_only"])


def test_noise_sharpness_draws_for_each_batch_and_weights_by_tokens():
    # Batches with different Hessians: each batch's mean increase estimates 0.5 s^2 tr(A_b), the
    # value their token-weighted mean, and the stderr is over the batch means (B - 1 dof).
    mats = [symmetric(torch.linspace(0.5, 1.0 + 2 * b, 8, dtype=torch.float64), seed=b) for b in range(4)]
    counts = [3, 5, 8, 4]
    model = Quadratic(mats[0], seed=6)
    center = model.w.detach().clone()  # at the minimum: L(w + d) - L(w) = 0.5 d^T A_b d exactly
    batches = [{"hessian": m, "count": torch.tensor(c), "center": center} for m, c in zip(mats, counts, strict=True)]
    sigma = 0.1
    result = perturbation_sensitivity(
        model, batches, PerturbationConfig(sigma=sigma, n_samples=400), seed=3, loss_fn=batch_quadratic_loss
    )
    s2 = sigma**2 * float((model.w.detach() ** 2).mean())
    per_batch = [0.5 * s2 * float(torch.trace(m)) for m in mats]
    assert result.n == 1600 and result.dof == 3 and result.stderr_covers == "batches"
    for got, want in zip(result.extra["per_batch"], per_batch, strict=True):
        assert abs(got - want) < 0.15 * want
    target = sum(c * x for c, x in zip(counts, per_batch, strict=True)) / sum(counts)
    assert abs(result.value - target) < 4 * result.extra["stderr_probes_only"]
    # The batches really differ, and the stderr over batch means sees it.
    assert result.stderr > 3 * result.extra["stderr_probes_only"]


# --- the batch-clustered stderr and the interval ------------------------------------------------


def test_batch_clustered_mean_is_the_stderr_of_batch_means():
    rng = np.random.default_rng(0)
    values = (rng.normal(size=(6, 1)) + 0.3 * rng.normal(size=(6, 5))).tolist()  # 6 batches x 5 probes
    est = batch_clustered_mean(values)
    means = np.mean(values, axis=1)
    assert est.value == pytest.approx(float(np.mean(values)), rel=1e-12)
    assert est.stderr == pytest.approx(float(np.std(means, ddof=1) / math.sqrt(6)), rel=1e-12)
    assert est.dof == 5 and est.covers == "batches"
    assert est.per_batch == pytest.approx(means.tolist(), rel=1e-12)
    probe_var = np.var(values, axis=1, ddof=1) / 5
    assert est.stderr_probes_only == pytest.approx(math.sqrt(float(probe_var.sum())) / 6, rel=1e-12)
    # The batch effect (sd 1) dominates the probe noise (0.3 / sqrt(5)): the independent-values
    # stderr is far too small here.
    assert mean_stderr(est.per_value)[1] < 0.6 * est.stderr


def test_batch_clustered_mean_weights_batches_by_tokens():
    values = [[1.0, 3.0], [10.0, 10.0], [4.0, 6.0]]
    counts = [2, 6, 2]
    est = batch_clustered_mean(values, counts)
    assert est.value == pytest.approx((2 * 2 + 6 * 10 + 2 * 5) / 10)
    assert sum(est.per_value) / len(est.per_value) == pytest.approx(est.value)
    # Scaling every count leaves everything alone.
    again = batch_clustered_mean(values, [20, 60, 20])
    assert (again.value, again.stderr) == pytest.approx((est.value, est.stderr), rel=1e-12)
    # Equal batch means give zero spread whatever the counts (rescaling each value by its
    # batch's count, as the independent formula does, would invent spread here).
    same = batch_clustered_mean([[2.0, 4.0], [3.0, 3.0], [1.0, 5.0]], [3, 9, 1])
    assert same.value == pytest.approx(3.0) and same.stderr == pytest.approx(0.0, abs=1e-12)
    assert mean_stderr(same.per_value)[1] > 0.5


def test_one_batch_says_its_stderr_covers_probes_only():
    est = batch_clustered_mean([[1.0, 2.0, 4.0, 5.0]])
    assert est.covers == "probes" and est.dof == 3
    assert est.stderr == pytest.approx(float(np.std([1, 2, 4, 5], ddof=1) / 2))
    assert batch_clustered_mean([[1.0]]).stderr is None
    assert batch_clustered_mean([[1.0], [2.0]]).stderr_probes_only is None
    with pytest.raises(ValueError, match="a batch has no values"):
        batch_clustered_mean([[1.0], []])
    with pytest.raises(ValueError, match="one positive count per batch"):
        batch_clustered_mean([[1.0], [2.0]], [1])


def test_interval_uses_t_with_the_given_dof_and_normal_without():
    assert quantile(0.95, None) == pytest.approx(1.959964, abs=1e-6)
    assert quantile(0.95, 1) == pytest.approx(12.7062, abs=1e-4)
    assert quantile(0.95, 7) == pytest.approx(2.364624, abs=1e-6)
    assert interval(10.0, 2.0, 3, 0.95) == pytest.approx((10 - 2 * 3.182446, 10 + 2 * 3.182446), abs=1e-5)
    assert interval(0.0, 1.0, 10_000, 0.9)[1] == pytest.approx(quantile(0.9, None), abs=1e-3)
    with pytest.raises(ValueError, match="at least 1 degree of freedom"):
        interval(0.0, 1.0, 0)
    with pytest.raises(ValueError, match="between 0 and 1"):
        interval(0.0, 1.0, 3, 95)


def test_coverage_of_the_hutchinson_interval_is_nominal_and_the_old_formula_is_not():
    # A small run of bench.coverage: 8 batches drawn per replication from batch Hessians
    # H_b = (1 + 0.3 g) H + E_b with tr(E[H_b]) = tr(H) known; 800 replications put the
    # Monte-Carlo sd of a 0.95 coverage at 0.008.
    from bench.coverage import simulate

    result = simulate("hutchinson", n_batches=8, reps=800, n_probes=4, seed=11)
    assert 0.92 <= result.t_batches <= 0.98
    assert 0.8 < result.spread_over_se < 1.25
    assert result.z_independent < 0.85  # every value independent: the band is about half as wide as it should be
    assert result.spread_over_se_independent > 1.6


def test_hutchinson_is_exact_for_a_diagonal_hessian():
    # Rademacher probes give v^T D v = tr(D) exactly: the reason to prefer them to Gaussians.
    a = torch.diag(torch.tensor([3.0, -1.0, 0.5, 2.0], dtype=torch.float64))
    result = hessian_trace(Quadratic(a), [{}], HessianTraceConfig(n_probes=5), loss_fn=quadratic_loss)
    assert result.value == pytest.approx(4.5, abs=1e-12)
    assert result.stderr == pytest.approx(0.0, abs=1e-12)
    assert result.stderr_covers == "probes" and result.dof == 4  # one batch: probe noise only


@pytest.mark.parametrize("method", ["power", "lanczos"])
@pytest.mark.parametrize("low,high", [(-1.0, 5.0), (-5.0, 1.0)])
def test_top_eigenvalue_on_quadratic(method, low, high, device):
    # (-5, 1): the dominant eigenvalue is negative; the value must still be the largest, +1.
    a = symmetric(torch.linspace(low, high, 20, dtype=torch.float64))
    config = HessianEigenConfig(method=method, tol=1e-8, max_iter=2000)
    result = hessian_top_eigenvalue(Quadratic(a), [{}], config, seed=3, loss_fn=quadratic_loss, device=device)
    assert result.value == pytest.approx(high, rel=1e-6)
    assert result.converged is True and result.residual <= 1e-8
    assert 1 < result.iterations < (4000 if method == "power" else 21)
    if method == "power":
        assert result.extra["dominant_eigenvalue"] == pytest.approx(max(low, high, key=abs), rel=1e-6)


def matrix_op(a: torch.Tensor):
    return lambda v: [a @ v[0]]


def start_vector(dim: int, seed: int = 0) -> list[torch.Tensor]:
    return [torch.randn(dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)]


def test_power_iteration_on_a_known_spectrum_reports_a_true_residual():
    spectrum = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.5, -3.0], dtype=torch.float64)
    a = symmetric(spectrum, seed=4)
    est = power_iteration(matrix_op(a), start_vector(6), max_iter=500, tol=1e-6)
    assert est.converged and est.eigenvalue == pytest.approx(10.0, rel=1e-9)
    v = est.vector[0]
    assert float(v.norm()) == pytest.approx(1.0)
    # The reported residual is that of the returned pair, computed here from scratch.
    true_residual = float((a @ v - est.eigenvalue * v).norm()) / 10.0
    assert est.residual == pytest.approx(true_residual, rel=1e-6) and est.residual <= 1e-6
    # The residual shrinks like (5 / 10)^k: about 20 products to reach 1e-6, far fewer than 500.
    assert 10 <= est.iterations <= 40


def test_power_iteration_capped_on_close_eigenvalues_is_not_converged():
    a = symmetric(torch.tensor([1.0, 0.99, 0.98, 0.5, 0.1], dtype=torch.float64), seed=5)
    est = power_iteration(matrix_op(a), start_vector(5, seed=1), max_iter=2, tol=1e-3)
    assert est.iterations == 2 and est.converged is False and est.residual > 1e-3
    result = hessian_top_eigenvalue(
        Quadratic(a), [{}], HessianEigenConfig(method="power", max_iter=2, tol=1e-3), seed=1, loss_fn=quadratic_loss
    )
    assert result.converged is False and result.residual > 1e-3 and result.iterations == 2


def test_power_iteration_on_plus_minus_a_is_not_fooled():
    # Eigenvalues +1 and -1 dominate: the Rayleigh quotient of H^k v0 stays at
    # (c1^2 - c2^2) / (c1^2 + c2^2) for every k, so its relative change is ~0 from the second
    # step (the old criterion declared convergence to a value far from any eigenvalue). The
    # residual stays about 1; Lanczos finds +1.
    a = symmetric(torch.tensor([1.0, -1.0, 0.3, 0.2, -0.1, 0.05], dtype=torch.float64), seed=6)
    _, evecs = torch.linalg.eigh(a)  # ascending: -1 first, +1 last
    start = [evecs[:, -1] + 0.9 * evecs[:, 0] + 0.1 * start_vector(6, seed=2)[0]]
    est = power_iteration(matrix_op(a), start, max_iter=300, tol=1e-3)
    assert est.converged is False and est.iterations == 300
    assert abs(est.eigenvalue) < 0.3  # about (1 - 0.81) / 1.81: no eigenvalue of H is near it
    assert est.residual > 0.5
    top = lanczos(matrix_op(a), start, max_iter=6, tol=1e-8)
    assert top.converged and top.eigenvalue == pytest.approx(1.0, rel=1e-9)


def test_sam_and_asam_on_quadratic_match_closed_form(device):
    a = symmetric(torch.linspace(0.5, 3.0, 6, dtype=torch.float64), seed=2)
    model = Quadratic(a, seed=4)
    w = model.w.detach().clone()
    g = a @ w
    rho = 0.05
    for adaptive in (False, True):
        if adaptive:
            t = w.abs()
            eps = rho * t * t * g / torch.linalg.vector_norm(t * g)
        else:
            eps = rho * g / torch.linalg.vector_norm(g)
        expected = float(g @ eps + 0.5 * eps @ a @ eps)  # exact for a quadratic
        config = SamConfig(rho=rho, adaptive=adaptive)
        result = sam_sharpness(model, [{}], config, loss_fn=quadratic_loss, device=device)
        assert result.value == pytest.approx(expected, rel=1e-10)
    assert torch.equal(model.w.detach(), w)


def test_noise_sharpness_on_quadratic_matches_expectation(device):
    # E[L(w + d)] - L(w) = 0.5 * sum_i A_ii Var(d_i) for zero-mean d.
    a = symmetric(torch.linspace(0.5, 3.0, 8, dtype=torch.float64), seed=5)
    model = Quadratic(a, seed=6)
    w = model.w.detach()
    rho, sigma = 0.1, 0.1
    adaptive = adaptive_sharpness(
        model, [{}], AdaptiveSharpnessConfig(rho=rho, n_samples=2000), seed=7, loss_fn=quadratic_loss, device=device
    )
    expected = 0.5 * float((torch.diag(a) * (rho * w) ** 2).sum())
    assert abs(adaptive.value - expected) < 3 * adaptive.stderr
    rms2 = float((w**2).mean())
    noise = perturbation_sensitivity(
        model, [{}], PerturbationConfig(sigma=sigma, n_samples=2000), seed=8, loss_fn=quadratic_loss, device=device
    )
    expected = 0.5 * sigma**2 * rms2 * float(torch.trace(a))
    assert abs(noise.value - expected) < 3 * noise.stderr


# --- a tiny OLMoE and its exact Hessian -------------------------------------------------------------


def tiny_olmoe(dtype: torch.dtype = torch.float64, experts: str = "eager", seed: int = 0) -> nn.Module:
    from transformers import OlmoeForCausalLM

    torch.manual_seed(seed)
    config = tiny_moe_config(VOCAB, hidden_size=8, num_layers=1, num_experts=2, top_k=1, num_heads=2, max_positions=16)
    config._experts_implementation = experts  # grouped_mm has no float64 kernel
    model = OlmoeForCausalLM(config).to(dtype).eval()
    with torch.no_grad():  # the router starts at zero: give it weights so routing varies by token
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0.0, 0.5)
    return model


def probe_batches() -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(11)
    first = torch.randint(3, VOCAB, (3, 6), generator=gen)
    second = torch.randint(3, VOCAB, (2, 5), generator=gen)
    mask = torch.ones_like(second)
    mask[0, :2] = 0  # left padding
    return [
        {"input_ids": first, "attention_mask": torch.ones_like(first)},
        {"input_ids": second, "attention_mask": mask},
    ]


def reference_loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum of next-token NLL over predictions whose context and target are real tokens."""
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    nll = -logp.gather(-1, ids[:, 1:, None])[..., 0]
    keep = (mask[:, :-1] * mask[:, 1:]).to(nll.dtype)
    return (nll * keep).sum(), int(keep.sum())


def exact_hessian(model: nn.Module, batches: list[dict], names: list[str]) -> torch.Tensor:
    """The float64 Hessian of the token-weighted loss over ``batches`` w.r.t. ``names``."""
    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]
    flat = torch.cat([params[n].detach().reshape(-1) for n in names]).requires_grad_(True)

    def loss(vec: torch.Tensor) -> torch.Tensor:
        new = {n: c.view(s) for n, c, s in zip(names, vec.split(sizes), shapes, strict=True)}
        total, count = 0.0, 0
        for b in batches:
            out = functional_call(model, new, args=(), kwargs=dict(b, use_cache=False))
            s, c = reference_loss(out.logits, b["input_ids"], b["attention_mask"])
            total, count = total + s, count + c
        return total / count

    with sdpa_kernel(SDPBackend.MATH):
        (grad,) = torch.autograd.grad(loss(flat), flat, create_graph=True)
        eye = torch.eye(flat.numel(), dtype=flat.dtype)
        # Rows in chunks: one vmapped backward over all 1,272 rows is far slower than 5 of 256.
        rows = [
            torch.autograd.grad(grad, flat, grad_outputs=eye[i : i + 256], is_grads_batched=True, retain_graph=True)[0]
            for i in range(0, flat.numel(), 256)
        ]
        hess = torch.cat(rows)
    return 0.5 * (hess + hess.T)


@pytest.fixture(scope="module")
def olmoe_exact(device):
    """The tiny float64 OLMoE on ``device``, its probe batches (on the CPU, as jobs hand them over) and its
    exact Hessian, formed on the CPU: the oracle never shares a device, or a kernel, with the metric."""
    model = tiny_olmoe()
    batches = probe_batches()
    names = [n for n, _ in model.named_parameters()]
    hess = exact_hessian(model, batches, names)
    return model.to(device), batches, hess


def test_lm_loss_matches_reference(olmoe_exact, device):
    model, batches, _ = olmoe_exact
    for b in (to_device(b, device) for b in batches):
        loss, count = lm_loss(model, b)
        with torch.no_grad():
            s, c = reference_loss(model(**b).logits, b["input_ids"], b["attention_mask"])
        assert count == c
        assert float(loss.detach()) == pytest.approx(float(s) / c, rel=1e-12)
    assert probe_batches()[1]["attention_mask"].sum() == 8 and lm_loss(model, to_device(batches[1], device))[1] == 6


def test_hutchinson_on_tiny_olmoe_matches_exact_trace(olmoe_exact, device):
    model, batches, hess = olmoe_exact
    exact = float(torch.trace(hess))
    # 2 batches x 150 probes; the model has 1,272 parameters.
    result = hessian_trace(model, batches, HessianTraceConfig(n_probes=150), seed=0, device=device)
    assert result.extra["n_params"] == hess.shape[0] == 1272
    # The exact Hessian is that of these two batches: the probe-only error is the one to compare
    # with, and it is narrow enough to mean something.
    assert abs(result.value - exact) < 3 * result.extra["stderr_probes_only"]
    assert result.extra["stderr_probes_only"] < 0.2 * abs(exact)
    # The two batches' traces differ far beyond probe noise; the stderr over batch means (1 dof),
    # which refers to the data distribution, is wider for it.
    first, second = result.extra["per_batch"]
    assert abs(first - second) > 5 * result.extra["stderr_probes_only"]
    assert result.dof == 1 and result.stderr > 2 * result.extra["stderr_probes_only"]


@pytest.mark.parametrize("method,max_iter", [("power", 1000), ("lanczos", 300)])
def test_top_eigenvalue_on_tiny_olmoe_matches_exact(olmoe_exact, method, max_iter, device):
    model, batches, hess = olmoe_exact
    top = float(torch.linalg.eigvalsh(hess)[-1])
    config = HessianEigenConfig(method=method, tol=1e-4, max_iter=max_iter)
    result = hessian_top_eigenvalue(model, batches, config, seed=0, device=device)
    assert result.converged is True and result.residual <= 1e-4 and result.iterations <= max_iter
    assert result.value == pytest.approx(top, rel=1e-4)
    config = HessianEigenConfig(method=method, tol=1e-4, max_iter=2)
    capped = hessian_top_eigenvalue(model, batches, config, seed=0, device=device)
    assert capped.converged is False and capped.residual > 1e-4 and capped.iterations == 2


def test_hessian_on_a_parameter_subset(olmoe_exact, device):
    model, batches, hess = olmoe_exact
    names = [n for n, _ in model.named_parameters()]
    chosen = {n for n, _ in select_params(model, "module:self_attn")}
    index, start = [], 0
    for n, p in model.named_parameters():
        if n in chosen:
            index.extend(range(start, start + p.numel()))
        start += p.numel()
    sub = hess[index][:, index]
    assert len(chosen) == 6 and len(names) == 14
    config = HessianEigenConfig(method="lanczos", tol=1e-8, max_iter=300, subset="module:self_attn")
    result = hessian_top_eigenvalue(model, batches, config, device=device)
    assert result.value == pytest.approx(float(torch.linalg.eigvalsh(sub)[-1]), rel=1e-3)


# --- Lanczos' memory rule and its certificate ---------------------------------------------------------


def test_the_basis_budget_picks_full_reorthogonalisation_or_the_three_term_recurrence(olmoe_exact, device):
    model, batches, hess = olmoe_exact
    top = float(torch.linalg.eigvalsh(hess)[-1])
    # 300 float64 vectors of 1,272 parameters: 2.91 MiB of basis.
    needed = 300 * 1272 * 8 / 2**20
    for budget, mode in ((3.0, "full"), (2.9, "none"), (0.0, "none")):
        config = HessianEigenConfig(method="lanczos", max_iter=300, tol=1e-8, basis_mb=budget)
        result = hessian_top_eigenvalue(model, batches, config, seed=0, device=device)
        assert result.extra["reorthogonalisation"] == mode, budget
        assert result.extra["basis_mb_needed"] == pytest.approx(needed)
        assert result.converged is True and result.value == pytest.approx(top, rel=1e-7), budget
    power = hessian_top_eigenvalue(
        model, batches, HessianEigenConfig(method="power", max_iter=5), seed=0, device=device
    )
    assert "reorthogonalisation" not in power.extra  # power iteration keeps two vectors whatever the budget
    assert HessianEigenConfig().method == "lanczos"


def test_three_term_lanczos_far_past_the_dimension_still_finds_the_top_eigenvalue():
    # 12 dimensions, 60 steps with a tol it cannot reach: the basis has long lost orthogonality and
    # T holds ghost copies of the converged values, but the largest Ritz value is still the largest
    # eigenvalue, and its residual still bounds its error.
    spectrum = torch.tensor([9.0, 8.5, 4.0, 3.0, 1.0, 0.5, 0.2, 0.0, -0.3, -1.0, -2.0, -8.0], dtype=torch.float64)
    a = symmetric(spectrum, seed=7)
    est = lanczos(matrix_op(a), start_vector(12, seed=3), max_iter=60, tol=1e-30, reorthogonalize=False)
    assert est.eigenvalue == pytest.approx(9.0, rel=1e-12)
    assert abs(est.eigenvalue - 9.0) <= est.residual * 9.0 + 1e-12
    full = lanczos(matrix_op(a), start_vector(12, seed=3), max_iter=60, tol=1e-30)
    assert full.converged and full.iterations <= 12  # with a kept basis, step 12 spans the space


@pytest.mark.parametrize("basis_mb", [1e9, 0.0], ids=["full", "three-term"])
def test_the_residual_certificate_covers_the_true_error_across_seeds(olmoe_exact, basis_mb, device):
    # |nearest eigenvalue of H - estimate| <= residual * |estimate| for a symmetric H, converged or not:
    # checked against the exact spectrum for many start vectors and iteration caps (tol 1e-3 stops
    # early; caps of 3 and 6 leave residuals of 1e-2 to 1: the bound must hold there too).
    model, batches, hess = olmoe_exact
    spectrum = torch.linalg.eigvalsh(hess)
    covered, total, converged, misses = 0, 0, 0, []
    for seed in range(20):
        for max_iter in (3, 6, 300):
            config = HessianEigenConfig(method="lanczos", max_iter=max_iter, tol=1e-3, basis_mb=basis_mb)
            result = hessian_top_eigenvalue(model, batches, config, seed=seed, device=device)
            error = float((spectrum - result.value).abs().min())
            ok = error <= result.residual * abs(result.value) * (1 + 1e-9)
            covered, total, converged = covered + ok, total + 1, converged + bool(result.converged)
            if not ok:
                misses.append((seed, max_iter, error, result.residual * abs(result.value)))
    assert covered == total, f"certificate covered {covered}/{total} (converged {converged}); misses {misses[:3]}"
    assert converged == 20, f"only the 20 uncapped runs converge, got {converged}/{total}"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"basis_mb": -1.0}, "basis_mb must be a number >= 0, got -1.0"),
        ({"basis_mb": math.nan}, "basis_mb must be a number >= 0, got nan"),
        ({"basis_mb": math.inf}, "basis_mb must be a number >= 0, got inf"),
        ({"basis_mb": "1024"}, "basis_mb must be a number >= 0, got '1024'"),
        ({"max_iter": 0}, "max_iter must be a positive integer, got 0"),
        ({"tol": 0.0}, "tol must be a positive number, got 0.0"),
        ({"method": "arnoldi"}, "method must be 'power' or 'lanczos', got 'arnoldi'"),
    ],
)
def test_bad_eigen_settings_fail_in_one_line(kwargs, message):
    with pytest.raises(ValueError) as err:
        HessianEigenConfig(**kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert str(err.value).startswith("hessian_top_eigenvalue: ")


def test_fisher_trace_matches_enumeration_over_labels(device):
    model = tiny_olmoe(seed=1)
    batch = probe_batches()[1]  # 5 predicted tokens, one sample left-padded
    params = [p for _, p in model.named_parameters()]
    valid = batch["attention_mask"][:, :-1].bool() & batch["attention_mask"][:, 1:].bool()
    positions = valid.nonzero().tolist()
    exact = 0.0
    for row, t in positions:
        logp = torch.log_softmax(model(**batch).logits[row, t], dim=-1)  # (V,)
        for y in range(VOCAB):
            grads = torch.autograd.grad(logp[y], params, retain_graph=True, allow_unused=True, materialize_grads=True)
            exact += float(logp[y].detach().exp()) * float(sum((g**2).sum() for g in grads))
    exact /= len(positions)
    # The exact value comes from the CPU; the estimate from the model moved to the device under test.
    result = fisher_trace(model.to(device), [batch], FisherTraceConfig(n_samples=300), seed=0, device=device)
    assert result.n == 300 and result.stderr_covers == "probes" and result.dof == 299
    assert abs(result.value - exact) < 3 * result.stderr
    assert result.stderr < 0.1 * exact


def test_fisher_single_prediction_is_unbiased(device):
    model = tiny_olmoe(seed=2)
    batch = {"input_ids": torch.tensor([[4, 7]]), "attention_mask": torch.ones(1, 2, dtype=torch.long)}
    params = list(model.parameters())
    logp = torch.log_softmax(model(**batch).logits[0, 0], dim=-1)
    exact = 0.0
    for y in range(VOCAB):
        grads = torch.autograd.grad(logp[y], params, retain_graph=True, allow_unused=True, materialize_grads=True)
        exact += float(logp[y].detach().exp()) * float(sum((g**2).sum() for g in grads))
    # Two copies of one batch: no batch-to-batch variation, so the probe-only error is the one
    # to compare with (the stderr over 2 batch means has 1 dof).
    result = fisher_trace(model.to(device), [batch, batch], FisherTraceConfig(n_samples=200), seed=5, device=device)
    assert result.dof == 1 and len(result.extra["per_batch"]) == 2
    assert abs(result.value - exact) < 3 * result.extra["stderr_probes_only"]


def test_adaptive_sharpness_vanishes_as_rho_goes_to_zero(device):
    model = tiny_olmoe().to(device)
    batches = probe_batches()
    zero = adaptive_sharpness(model, batches, AdaptiveSharpnessConfig(rho=0.0, n_samples=2), device=device)
    assert zero.value == 0.0
    small = adaptive_sharpness(model, batches, AdaptiveSharpnessConfig(rho=1e-7, n_samples=4), device=device)
    large = adaptive_sharpness(model, batches, AdaptiveSharpnessConfig(rho=0.3, n_samples=4), device=device)
    assert abs(small.value) < 1e-5 * abs(large.value)


def test_perturbation_restores_weights_bitwise_even_when_the_loss_raises(device):
    # On the device under test, so the metrics perturb this very model in place (no working copy).
    model = tiny_olmoe(dtype=torch.float32, experts="grouped_mm").to(device)
    model.train()  # the caller's mode must come back too
    for p in model.parameters():
        p.requires_grad_(False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batches = probe_batches()

    perturbation_sensitivity(model, batches, PerturbationConfig(sigma=0.1, n_samples=2), device=device)
    adaptive_sharpness(model, batches, AdaptiveSharpnessConfig(rho=0.1, n_samples=2), device=device)
    sam_sharpness(model, batches, SamConfig(rho=0.1, adaptive=True), device=device)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n

    calls = []

    def failing_loss(m: nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
        calls.append(1)
        if len(calls) == 4:  # the first batch's base loss and 2 draws, then fail inside the third draw
            raise RuntimeError("out of memory (simulated)")
        return lm_loss(m, batch)

    with pytest.raises(RuntimeError, match="simulated"):
        config = PerturbationConfig(sigma=0.5, n_samples=3)
        perturbation_sensitivity(model, batches, config, loss_fn=failing_loss, device=device)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
        assert p.requires_grad is False
    assert model.training is True


def test_eager_and_sdpa_attention_give_the_same_hutchinson_estimate(tmp_path, device):
    from analysis.models import build_word_tokenizer, load_model

    model = tiny_olmoe(dtype=torch.float32, experts="grouped_mm")
    model.save_pretrained(tmp_path)
    build_word_tokenizer([f"w{i}" for i in range(VOCAB - 4)]).save_pretrained(tmp_path)
    eager, _ = load_model(tmp_path, device=device, attn_implementation="eager")
    sdpa, _ = load_model(tmp_path, device=device, attn_implementation="sdpa")
    assert eager.config._attn_implementation == "eager" and sdpa.config._attn_implementation == "sdpa"
    batches = probe_batches()
    config = HessianTraceConfig(n_probes=3)
    a = hessian_trace(eager, batches, config, seed=4, device=device)
    b = hessian_trace(sdpa, batches, config, seed=4, device=device)
    assert a.value == pytest.approx(b.value, rel=1e-4)


def test_bf16_model_is_measured_on_an_fp32_copy_and_left_alone(device):
    model = tiny_olmoe(dtype=torch.float32, experts="grouped_mm").to(device, torch.bfloat16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batches = probe_batches()
    config = HessianTraceConfig(n_probes=2)
    low = hessian_trace(model, batches, config, seed=9, device=device)
    high = hessian_trace(model.float(), batches, config, seed=9, device=device)  # .float() returns the same module
    assert low.value == pytest.approx(high.value, rel=1e-5)
    model.to(torch.bfloat16)
    for n, p in model.named_parameters():
        assert p.dtype == torch.bfloat16 and torch.equal(p, before[n]), n


def test_select_params_subsets_and_errors():
    model = tiny_olmoe()
    names = lambda subset: [n for n, _ in select_params(model, subset)]  # noqa: E731
    assert len(names("all")) == 14
    assert "model.embed_tokens.weight" not in names("no_embeddings")
    assert "lm_head.weight" in names("no_embeddings")
    assert all(n.startswith("model.layers.0.") for n in names("layer:0")) and len(names("layer:0")) == 11
    assert names("module:mlp") == [
        "model.layers.0.mlp.gate.weight",
        "model.layers.0.mlp.experts.gate_up_proj",
        "model.layers.0.mlp.experts.down_proj",
    ]
    with pytest.raises(ValueError, match=r"'layer:3' selects no parameters of OlmoeForCausalLM \(layers found: 0-0"):
        select_params(model, "layer:3")
    with pytest.raises(ValueError, match="unknown parameter subset 'layers:1'"):
        select_params(model, "layers:1")
    with pytest.raises(ValueError, match="n_probes must be a positive integer"):
        HessianTraceConfig(n_probes=0)
    with pytest.raises(ValueError, match="unknown parameter subset"):
        SamConfig(subset="attn")
