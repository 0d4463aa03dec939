"""The demo's settings: the task (operators, sequence layout), ``DemoConfig`` and its checkpoint schedule,
the two demo runs, and the evaluation and fine-tune jobs queued on them."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

MARKER = "COMPLETE"
# Bump when the split or the training code changes what a config produces: a finished run of an
# older version then no longer counts as complete and is rebuilt. Markers without one are version 1.
DEMO_VERSION = 1
OPS: dict[str, Callable[[int, int, int], int]] = {
    "+": lambda a, b, p: (a + b) % p,
    "-": lambda a, b, p: (a - b) % p,
    "*": lambda a, b, p: (a * b) % p,
}
SEQ_LEN = 7  # <bos> a op b = c <eos>
ANSWER_POS = 5  # index of c in the sequence; predicted from position 4 (the "=")


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, math.isqrt(n) + 1))


def _n_train_unordered(p: int, train_fraction: float) -> int:
    """Unordered training pairs (a <= b) at ``train_fraction``."""
    return round(train_fraction * (p * (p + 1) // 2))


def checkpoint_steps(steps: int, n: int) -> list[int]:
    """About ``n`` log-spaced steps in ``[max(1, steps // 100), steps]``, always ending with ``steps``.

    Starting at 1% of the run instead of step 1 spends the checkpoints where the run changes
    (the fit and the later generalisation) rather than on steps 1, 2, 3.
    """
    first = max(1, steps // 100)
    if n <= 1 or first >= steps:
        return [steps]
    ratio = (steps / first) ** (1 / (n - 1))
    return sorted({min(steps, round(first * ratio**i)) for i in range(n)} | {steps})


@dataclass(frozen=True)
class DemoConfig:
    """Settings of one demo run. Everything that changes the trained weights is here."""

    note: str = ""  # one line shown beside the run in the UI
    seed: int = 0  # model init, train/held-out split and batch order
    p: int = 97  # the modulus, a prime: numbers are the tokens 0..p-1
    op: str = "+"  # "+", "-" or "*"
    train_fraction: float = 0.6  # share of the unordered pairs {a, b} trained on; at most EVAL_TRAIN_FRACTION
    steps: int = 500  # optimizer updates
    batch_size: int = 512  # sequences per update, drawn without replacement within an epoch
    lr: float = 1e-3  # AdamW peak learning rate, reached after a linear warmup and then held
    warmup_steps: int = 10
    weight_decay: float = 1.0  # decoupled (AdamW); with the train fraction, decides generalising vs memorising
    beta1: float = 0.9
    beta2: float = 0.98  # as in the grokking literature: faster second-moment adaptation
    eval_every: int = 10  # steps between held-out evaluations (checkpoint steps are always evaluated)
    eval_samples: int = 1024  # held-out pairs scored at those evaluations (the first N: fixed)
    n_checkpoints: int = 12  # log-spaced checkpoint steps; the last step is always one of them
    # Plus one checkpoint every ``dense_every`` steps from ``dense_from`` (a share of the run) to its end,
    # where the runs memorise and generalise (0: log-spaced only). Memorisation groups need several
    # checkpoints there, and a window test needs points inside the flat stretch.
    dense_every: int = 25
    dense_from: float = 0.5
    # The model: an OLMoE (1.7M parameters) that trains 500 steps on one CPU core in about 3 minutes.
    hidden_size: int = 128
    num_layers: int = 2
    num_experts: int = 8
    top_k: int = 2
    num_heads: int = 4

    def __post_init__(self) -> None:
        problems = []
        if not _is_prime(self.p):
            problems.append(f"p={self.p} must be a prime (>= 2)")
        if self.op not in OPS:
            problems.append(f"op={self.op!r} must be one of {sorted(OPS)}")
        if not 0.0 < self.train_fraction <= EVAL_TRAIN_FRACTION:
            problems.append(f"train_fraction={self.train_fraction} must be in (0, {EVAL_TRAIN_FRACTION}]")
        else:
            n_train = _n_train_unordered(self.p, self.train_fraction)
            if not 0 < n_train < self.p * (self.p + 1) // 2:
                problems.append(f"train_fraction={self.train_fraction} leaves an empty train or held-out set")
        for name in ("steps", "batch_size", "eval_every", "eval_samples", "n_checkpoints", "hidden_size", "num_layers"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be >= 1")
        if self.dense_every < 0:
            problems.append(f"dense_every={self.dense_every} must be >= 0")
        if not 0.0 <= self.dense_from <= 1.0:
            problems.append(f"dense_from={self.dense_from} must be in [0, 1] (a share of the run)")
        if not 0 <= self.warmup_steps <= self.steps:
            problems.append(f"warmup_steps={self.warmup_steps} must be in [0, steps]")
        if self.lr <= 0:
            problems.append(f"lr={self.lr} must be > 0")
        if self.weight_decay < 0:
            problems.append(f"weight_decay={self.weight_decay} must be >= 0")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            problems.append(f"beta1={self.beta1}, beta2={self.beta2} must be in [0, 1)")
        if not 1 <= self.top_k <= self.num_experts:
            problems.append(f"top_k={self.top_k} must be in [1, num_experts={self.num_experts}]")
        if self.num_heads < 1 or self.hidden_size % self.num_heads:
            problems.append(f"hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}")
        if problems:
            raise ValueError("DemoConfig: " + "; ".join(problems))

    def checkpoint_steps(self) -> list[int]:
        """The steps saved as checkpoints: log-spaced, then every ``dense_every`` steps from ``dense_from``."""
        steps = set(checkpoint_steps(self.steps, self.n_checkpoints))
        if self.dense_every:
            start = round(self.steps * self.dense_from)
            dense = set(range(max(start, 1), self.steps + 1, self.dense_every))
            steps = {s for s in steps if s < start} | dense | {self.steps}
        return sorted(steps)

    def scaled(self, scale: float) -> DemoConfig:
        """The same run with ``steps`` (and warmup, checkpoint count) multiplied by ``scale``.

        For fast tests: ``scale=0.05`` trains 25 steps with 4 checkpoints. ``scale=1`` is the identity.
        """
        if not scale > 0:
            raise ValueError(f"scale={scale} must be > 0")
        if scale == 1:
            return self
        steps = max(1, round(self.steps * scale))
        return replace(
            self,
            steps=steps,
            warmup_steps=min(steps, round(self.warmup_steps * scale)),
            n_checkpoints=max(4, round(self.n_checkpoints * min(scale, 1.0))),
            dense_every=0 if scale < 1 else self.dense_every,
            eval_samples=max(64, round(self.eval_samples * min(scale, 1.0))),
        )


# The train fraction whose held-out pairs every demo run is scored on (and the bundled task uses):
# the grokking run's, so no demo run trains on them (the memorizing run's pairs are a subset).
EVAL_TRAIN_FRACTION = 0.6

# Both runs: 3,000 steps, checkpoints log-spaced up to step 450 (the fit) and every 100 steps after.
# The grokking run fits its training pairs by about step 500 and generalises 1,000-2,000 steps later
# (held-out accuracy under 0.05 until about step 1,500, near 1 by 2,400 in a trial run): weight
# decay 2 with 60% of the pairs. In other trials, 70% with weight decay 1 or 0.3 generalised while it
# fitted; 55% with weight decay 2 had only begun by step 3,000 (accuracy 0.10); 30-60% with weight
# decay 1 had not begun by step 700-2,300.
_LONG = DemoConfig(steps=3000, dense_from=0.15, dense_every=100)
DEMO_RUNS: dict[str, DemoConfig] = {
    "grokking": replace(
        _LONG,
        note="weight decay 2, 60% of pairs: fits its pairs by step ~500, held-out accuracy rises ~1,000 steps later",
        weight_decay=2.0,
        train_fraction=0.6,
    ),
    "memorizing": replace(
        _LONG,
        note="weight decay 0, 30% of pairs: the same train loss, held-out accuracy stays near chance",
        weight_decay=0.0,
        train_fraction=0.3,
    ),
}


# What `python -m analysis demo` computes on every demo checkpoint, so each page has data on first
# open: the bundled tasks, held-out loss, per-sample memorisation rows (the answer token only: the
# operands are random and unpredictable), and every internal metric. The top eigenvalue's settings equal
# its defaults (Lanczos, max_iter 40, tol 1e-3): spelled out so the demo keeps them if the defaults
# move, and because the shipped results' provenance records them.
DEMO_EVAL: dict[str, Any] = {
    "tasks": ("modarith_mc", "modarith_em"),
    "metrics": (
        "heldout_loss",
        "memorisation",
        "hessian_trace",
        "hessian_top_eigenvalue",
        "fisher_trace",
        "adaptive_sharpness",
        "perturbation_sensitivity",
        "sam_sharpness",
        "pathway_distance",
        "pathway_distance_chars",
        "pathway_consistency",
        "pathway_consistency_normalized",
        "routing_entropy",
        "expert_load",
        "gradient_alignment",
    ),
    "metric_params": {
        "memorisation": {"answer_tokens": "1"},
        "hessian_top_eigenvalue": {"method": "lanczos", "max_iter": "40", "tol": "1e-3"},
    },
    "limit": 100,  # documents per task
}


# The fine-tune probe on the demo runs (see README, The fine-tune probe): full fine-tuning on modular
# subtraction, which neither run saw, scored by the answer's perplexity (accuracy stays near 0), on
# ``FINETUNE_CHECKPOINTS`` checkpoints spread over the run (20-100 s each on 2 shared cores).
DEMO_FINETUNE: dict[str, Any] = {
    "metrics": ("finetune",),
    "metric_params": {
        "finetune": {
            "task": "modsub",
            "method": "full",
            "steps": "300",
            "score": "perplexity,none",
            "other_tasks": "modarith_mc",
        }
    },
}
FINETUNE_CHECKPOINTS = 6


def finetune_steps(cfg: DemoConfig, n: int = FINETUNE_CHECKPOINTS) -> tuple[int, ...]:
    """``n`` of the run's checkpoint steps, evenly spread over its list (first and last included)."""
    steps = cfg.checkpoint_steps()
    if n >= len(steps):
        return tuple(steps)
    picks = {steps[round(i * (len(steps) - 1) / (n - 1))] for i in range(n)} if n > 1 else {steps[-1]}
    return tuple(sorted(picks))


def demo_finetune_spec(run: str, *, device: str = "auto", scale: float = 1.0):
    """The fine-tune probe job of one demo run (see DEMO_FINETUNE), on the run trained at ``scale``."""
    from analysis.jobs.spec import JobSpec

    return JobSpec(run=run, steps=finetune_steps(DEMO_RUNS[run].scaled(scale)), device=device, **DEMO_FINETUNE)


def demo_eval_spec(run: str, *, device: str = "auto", **overrides):
    """The evaluation job of one demo run (see DEMO_EVAL); ``overrides`` replace JobSpec fields."""
    from analysis.jobs.spec import JobSpec

    settings = {**DEMO_EVAL, **overrides}
    return JobSpec(run=run, device=device, **settings)
