"""Coverage of the probe-based standard errors, by simulation with a known truth.

For each estimator and number of probe batches B, many replications draw B fresh batches
from a population whose true value is set here, run the project's estimator on them, and
count how often the nominal 95% interval covers the truth. Three intervals side by side:

- ``t, batches``: estimate ± t(B-1) * stderr, the stderr over batch means
  (:func:`analysis.metrics.common.batch_clustered_mean`) and the quantile of
  :func:`analysis.metrics.common.interval`: what the project reports;
- ``z, batches``: the same stderr with the normal 1.96, to show why the quantile is t;
- ``z, independent``: the baseline, every probe x batch value treated as independent
  (the stderr the flatness metrics reported before), with 1.96.

``spread/se`` is the standard deviation of the estimates over replications divided by the
root mean square of a stderr: about 1 for a stderr that measures the real spread.

Populations (all truths exact):

- Hutchinson trace: a quadratic loss per batch, L_b(w) = 0.5 w^T H_b w with
  H_b = H + E_b (E_b symmetric, zero mean), so the truth is tr(H); the values are
  :func:`analysis.metrics.flatness.hutchinson_probes` on the batch Hessian (HVP = matrix
  product), Rademacher probes, combined by ``batch_clustered_mean``.
- Fisher trace: :func:`analysis.metrics.flatness.fisher_trace` itself on a bigram model
  (logits = a V x V table row of the current token) over batches of random token
  sequences of random lengths (right padding, so batch token counts differ); the
  per-token Fisher trace of context c is 1 - ||softmax(W_c)||^2, and the truth is its
  mean over the token distribution.
- Perturbation sensitivity: :func:`analysis.metrics.flatness.perturbation_sensitivity`
  itself on the quadratic model above; with d ~ N(0, s^2 I), s = sigma * RMS(w), the
  truth is E[L_b(w + d) - L_b(w)] = 0.5 s^2 tr(H).
- Held-out loss ratio (when ``analysis.evals.heldout.ratio_stderr`` exists): per-unit NLL
  sums and token counts whose per-token mean depends on the length; the truth is
  E[S] / E[N]; the baseline treats every token as independent.

    python -m bench.coverage [--reps 400] [--batches 2,4,8,32] [--probes 4] [--seed 0]
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from analysis.metrics.common import batch_clustered_mean, interval, mean_stderr

LEVEL = 0.95


@dataclass(frozen=True)
class Draw:
    """One replication: the estimate, its stderrs, the dof of the new one and the truth."""

    estimate: float
    stderr: float  # over batch means (the project's)
    dof: float | None
    stderr_independent: float  # every value independent (the baseline)
    truth: float


@dataclass(frozen=True)
class Coverage:
    """Coverage over replications of the three intervals, and spread / stderr ratios."""

    name: str
    n_batches: int
    reps: int
    t_batches: float
    z_batches: float
    z_independent: float
    spread_over_se: float
    spread_over_se_independent: float


def summarise(name: str, n_batches: int, draws: list[Draw]) -> Coverage:
    """Coverage of the nominal LEVEL intervals over ``draws``."""
    est = np.array([d.estimate for d in draws])
    truth = np.array([d.truth for d in draws])
    se = np.array([d.stderr for d in draws])
    se_ind = np.array([d.stderr_independent for d in draws])
    t_lo, t_hi = np.array([interval(d.estimate, d.stderr, d.dof, LEVEL) for d in draws]).T
    z = float(interval(0.0, 1.0, None, LEVEL)[1])
    spread = float(np.std(est - truth, ddof=1))
    return Coverage(
        name,
        n_batches,
        len(draws),
        float(np.mean((t_lo <= truth) & (truth <= t_hi))),
        float(np.mean(np.abs(est - truth) <= z * se)),
        float(np.mean(np.abs(est - truth) <= z * se_ind)),
        spread / math.sqrt(float(np.mean(se**2))),
        spread / math.sqrt(float(np.mean(se_ind**2))),
    )


def _clustered_draw(values: list[list[float]], counts: list[int] | None, truth: float) -> Draw:
    est = batch_clustered_mean(values, counts)
    _, independent = mean_stderr(est.per_value)  # the former formula, on the same values
    return Draw(est.value, est.stderr, est.dof, independent, truth)


# --- Hutchinson on batch Hessians --------------------------------------------------------------


@dataclass(frozen=True)
class BatchHessians:
    """H_b = (1 + scale_sd g_b) H + E_b, g_b ~ N(0, 1), E_b symmetric with N(0, diag_sd^2) on the
    diagonal and N(0, off_sd^2) off it: some batches are sharper than others, as text batches are.
    E[H_b] = H."""

    hessian: torch.Tensor  # (d, d) population Hessian H
    scale_sd: float = 0.3
    diag_sd: float = 0.3
    off_sd: float = 0.05

    @staticmethod
    def make(dim: int = 16, seed: int = 0) -> BatchHessians:
        gen = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
        # Mostly diagonal, so the probe noise is modest and the batch-to-batch spread dominates,
        # as on language-model batches; some off-diagonal mass keeps Rademacher probes noisy.
        small = 0.1 * q @ torch.diag(torch.linspace(-1.0, 1.0, dim, dtype=torch.float64)) @ q.T
        hessian = torch.diag(torch.linspace(0.5, 3.0, dim, dtype=torch.float64)) + small
        return BatchHessians(hessian)

    @property
    def truth(self) -> float:
        return float(torch.trace(self.hessian))

    def draw(self, gen: torch.Generator) -> torch.Tensor:
        dim = self.hessian.shape[0]
        off = self.off_sd * torch.randn(dim, dim, generator=gen, dtype=torch.float64)
        off = torch.triu(off, 1)
        diag = self.diag_sd * torch.randn(dim, generator=gen, dtype=torch.float64)
        scale = 1.0 + self.scale_sd * float(torch.randn((), generator=gen, dtype=torch.float64))
        return scale * self.hessian + off + off.T + torch.diag(diag)


def hutchinson_draw(pop: BatchHessians, n_batches: int, n_probes: int, gen: torch.Generator) -> Draw:
    """One replication of the Hutchinson trace over ``n_batches`` fresh batch Hessians."""
    from analysis.metrics.flatness import hutchinson_probes

    like = [pop.hessian[0]]
    values = []
    for _ in range(n_batches):
        h_b = pop.draw(gen)
        values.append(hutchinson_probes(lambda v, h=h_b: [h @ v[0]], like, n_probes, gen))
    return _clustered_draw(values, None, pop.truth)


# --- the quadratic model (perturbation sensitivity) ------------------------------------------------


class QuadraticModel(nn.Module):
    """Weights w near a minimum c; the loss of a batch is 0.5 (w - c)^T H_b (w - c), H_b carried by the batch."""

    def __init__(self, dim: int, seed: int = 1) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(dim, generator=gen, dtype=torch.float64))
        # Near, not at, the minimum: a small gradient whose term in L(w + d) - L(w) is zero-mean noise.
        self.register_buffer("center", self.w.detach() + 0.02 * torch.randn(dim, generator=gen, dtype=torch.float64))


def quadratic_loss(model: nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
    """0.5 (w - c)^T H_b (w - c), one item."""
    x = model.w - model.center
    return 0.5 * x @ batch["hessian"] @ x, 1


def perturbation_draw(
    pop: BatchHessians, model: QuadraticModel, n_batches: int, n_draws: int, gen: torch.Generator, seed: int
) -> Draw:
    """One replication of perturbation_sensitivity (the metric itself) on fresh batch Hessians."""
    from analysis.metrics.flatness import PerturbationConfig, perturbation_sensitivity

    sigma = 0.1
    batches = [{"hessian": pop.draw(gen)} for _ in range(n_batches)]
    result = perturbation_sensitivity(
        model, batches, PerturbationConfig(sigma=sigma, n_samples=n_draws), seed=seed, loss_fn=quadratic_loss
    )
    w = model.w.detach()
    s2 = sigma**2 * float((w**2).mean())
    truth = 0.5 * s2 * pop.truth
    _, independent = mean_stderr(result.per_probe)
    return Draw(result.value, result.stderr, result.dof, independent, truth)


# --- the bigram model (Fisher trace) -----------------------------------------------------------------


class Bigram(nn.Module):
    """logits(t) = W[token t]: the smallest language model with an exact per-token Fisher trace."""

    def __init__(self, vocab: int = 8, seed: int = 2) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        # Row scales from flat to peaked, so the per-token Fisher trace differs by context.
        scale = torch.linspace(0.2, 4.0, vocab, dtype=torch.float64)[:, None]
        self.table = nn.Parameter(scale * torch.randn(vocab, vocab, generator=gen, dtype=torch.float64))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, use_cache: bool = False):
        return SimpleNamespace(logits=self.table[input_ids])  # (B, T, V)

    def fisher_per_context(self) -> torch.Tensor:
        """1 - ||p_c||^2 for each context token c: E_y ||e_y - p_c||^2, the per-token Fisher trace."""
        p = torch.softmax(self.table.detach(), dim=-1)
        return 1.0 - (p**2).sum(-1)


def fisher_draw(model: Bigram, n_batches: int, n_draws: int, rng: np.random.Generator, seed: int) -> Draw:
    """One replication of fisher_trace (the metric itself) on fresh random token batches.

    Each batch has a topic: token probabilities pi_b ~ Dirichlet(0.5, ..., 0.5), so batches
    differ in content (E[pi_b] is uniform). Each batch: 4 sequences of 12 token slots with
    4..12 real tokens (right padding), tokens from pi_b; contexts are the real tokens but
    the last of each sequence, uniform on average, so the truth is the mean over the
    vocabulary of the per-context Fisher trace.
    """
    from analysis.metrics.flatness import FisherTraceConfig, fisher_trace

    vocab = model.table.shape[0]
    batches = []
    for _ in range(n_batches):
        pi = rng.dirichlet(np.full(vocab, 0.5))
        ids = torch.from_numpy(rng.choice(vocab, size=(4, 12), p=pi))
        lengths = torch.from_numpy(rng.integers(4, 13, 4))
        mask = (torch.arange(12)[None, :] < lengths[:, None]).long()
        batches.append({"input_ids": ids, "attention_mask": mask})
    result = fisher_trace(model, batches, FisherTraceConfig(n_samples=n_draws), seed=seed)
    truth = float(model.fisher_per_context().mean())  # contexts uniform over the vocabulary
    _, independent = mean_stderr(result.per_probe)
    return Draw(result.value, result.stderr, result.dof, independent, truth)


# --- held-out loss ratio ------------------------------------------------------------------------------


def heldout_draw(n_units: int, rng: np.random.Generator, ratio_stderr: Callable, ratio_df: Callable | None) -> Draw:
    """One replication of the token-weighted loss sum(S) / sum(N) over ``n_units`` sequences.

    N ~ uniform{10..50}; per-token mean mu = 2 + 0.3 (N - 30) / sd(N) + 0.3 e (longer
    sequences are harder, so the ratio is not the mean of per-sequence means); token losses
    mu + 0.5 e'. Truth: E[N mu] / E[N] = 2 + 0.3 sd(N) / 30.
    """
    counts = rng.integers(10, 51, n_units)
    sd_n = math.sqrt((41**2 - 1) / 12)
    mu = 2.0 + 0.3 * (counts - 30) / sd_n + 0.3 * rng.standard_normal(n_units)
    tokens = [m + 0.5 * rng.standard_normal(c) for m, c in zip(mu, counts, strict=True)]
    sums = [float(t.sum()) for t in tokens]
    estimate = math.fsum(sums) / float(counts.sum())
    stderr = ratio_stderr(sums, [float(c) for c in counts])
    dof = ratio_df([float(c) for c in counts]) if ratio_df is not None else n_units - 1
    every = np.concatenate(tokens)
    independent = float(every.std(ddof=1) / math.sqrt(len(every)))
    return Draw(estimate, stderr, dof, independent, 2.0 + 0.3 * sd_n / 30)


# --- driver --------------------------------------------------------------------------------------------


def simulate(name: str, n_batches: int, reps: int, n_probes: int = 4, seed: int = 0) -> Coverage:
    """Coverage of estimator ``name`` ("hutchinson", "fisher", "perturbation", "heldout") at B batches."""
    gen = torch.Generator().manual_seed(seed)
    if name == "hutchinson":
        pop = BatchHessians.make()
        draws = [hutchinson_draw(pop, n_batches, n_probes, gen) for _ in range(reps)]
    elif name == "perturbation":
        pop = BatchHessians.make()
        model = QuadraticModel(pop.hessian.shape[0])
        draws = [perturbation_draw(pop, model, n_batches, n_probes, gen, seed * reps + i) for i in range(reps)]
    elif name == "fisher":
        model = Bigram()
        rng = np.random.default_rng(seed)
        draws = [fisher_draw(model, n_batches, n_probes, rng, seed * reps + i) for i in range(reps)]
    elif name == "heldout":
        from analysis.evals import heldout

        ratio_df = getattr(heldout, "ratio_df", None)
        rng = np.random.default_rng(seed)
        draws = [heldout_draw(n_batches, rng, heldout.ratio_stderr, ratio_df) for _ in range(reps)]
    else:
        raise ValueError(f"unknown estimator {name!r}; use hutchinson, fisher, perturbation or heldout")
    return summarise(name, n_batches, draws)


ESTIMATORS = {
    "hutchinson": "Hutchinson trace (Rademacher)",
    "fisher": "Fisher trace (sampled labels)",
    "perturbation": "perturbation sensitivity",
    "heldout": "held-out loss ratio (tokens)",
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=400, help="replications per row")
    parser.add_argument("--batches", default="2,4,8,32", help="numbers of batches (units), comma-separated")
    parser.add_argument("--probes", type=int, default=4, help="probes / label draws / noise draws per batch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (tiny tensors: 1 is fastest)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = [int(x) for x in args.batches.split(",")]
    mc = math.sqrt(LEVEL * (1 - LEVEL) / args.reps)
    print(
        f"Coverage of nominal {LEVEL:.0%} intervals, {args.reps} replications per row "
        f"(Monte-Carlo sd {mc:.3f} at {LEVEL}); {args.probes} probes/draws per batch.\n"
        "ours = stderr over batch means with t(B-1) (held-out: the ratio stderr with its own dof); "
        "baseline = every value independent, 1.96.\n"
        "spread/se: sd of the estimates over replications / rms stderr (1 = honest)."
    )
    header = (
        f"{'estimator':34} {'B':>3} {'ours t':>7} {'ours z':>7} {'baseline':>8} {'spread/se':>9} {'(baseline)':>10}"
    )
    print(header)
    print("-" * len(header))
    start = time.perf_counter()
    for name, label in ESTIMATORS.items():
        if name == "heldout":
            try:
                from analysis.evals.heldout import ratio_stderr  # noqa: F401
            except ImportError:
                print(f"{label:34} skipped: analysis.evals.heldout.ratio_stderr is not there")
                continue
        for n_batches in sizes:
            c = simulate(name, n_batches, args.reps, args.probes, args.seed)
            print(
                f"{label:34} {n_batches:>3} {c.t_batches:>7.3f} {c.z_batches:>7.3f} {c.z_independent:>8.3f} "
                f"{c.spread_over_se:>9.2f} {c.spread_over_se_independent:>10.2f}"
            )
    print(f"({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
