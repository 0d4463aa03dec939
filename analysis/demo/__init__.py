"""The embedded demo: two tiny mixture-of-experts runs with the same train loss and different downstream.

Both runs train an OLMoE (transformers' mixture-of-experts causal LM) from scratch on modular
arithmetic written as text, ``<bos> a + b = c <eos>`` with ``c = (a + b) mod p``. The objective is
the cross-entropy of the answer token and of ``<eos>`` (the prompt is given, not learnt). The runs
differ in weight decay and in how many of the pairs they see (nested splits, see :func:`split_pairs`):

- ``grokking`` (weight decay 1.0, 70% of the pairs): learns the rule; held-out accuracy climbs to
  near 1 while train loss settles;
- ``memorizing`` (weight decay 0, 30% of the pairs): reaches the same train loss and accuracy
  sooner, and stays at chance on the held-out pairs for the whole run.

Both are scored on the same held-out pairs, which neither trains on. So a train-loss curve cannot
tell the two apart; downstream accuracy (and, the dashboard's question, some internal signal) can.
Each run folder holds::

    <run>/run.json            settings, model summary, split sizes, checkpoint steps, versions
    <run>/metrics.jsonl       one JSON object per step: step, tokens, train/*, and eval/* on eval steps
    <run>/step_<N>/           save_pretrained (safetensors) + tokenizer, log-spaced N, last step included
    <run>/COMPLETE            written last; holds the config, so an interrupted build is redone

Logged losses and accuracies are of the answer token only (``<eos>`` is trivially predictable after a
few steps and would only halve the numbers); ``train/*`` is measured on the step's batch before its
update, ``eval/*`` on the first ``eval_samples`` held-out pairs after the update. The task data,
``data/tasks/modarith/{heldout,train}.jsonl``, is written by :func:`write_task_files` from the same
:func:`split_pairs` the trainer uses (a test checks that the files still match).
"""

from __future__ import annotations

import json
import math
import random
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from analysis.models import EOS, build_word_tokenizer, tiny_moe_config

if TYPE_CHECKING:
    from multiprocessing.sharedctypes import Synchronized

MARKER = "COMPLETE"
# Bump when the split or the training code changes what a config produces: a finished run of an
# older version then no longer counts as complete and is rebuilt. Markers without one are version 1.
DEMO_VERSION = 1
TASK_DIR = Path(__file__).resolve().parents[2] / "data" / "tasks" / "modarith"
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


@dataclass(frozen=True)
class DemoConfig:
    """Settings of one demo run. Everything that changes the trained weights is here."""

    note: str = ""  # one line shown beside the run in the UI
    seed: int = 0  # model init, train/held-out split and batch order
    p: int = 97  # the modulus, a prime: numbers are the tokens 0..p-1
    op: str = "+"  # "+", "-" or "*"
    train_fraction: float = 0.7  # share of the unordered pairs {a, b} trained on; at most EVAL_TRAIN_FRACTION
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
    # Plus one checkpoint every ``dense_every`` steps over the second half, where the runs memorise
    # and generalise (0: log-spaced only). Memorisation groups need several checkpoints there.
    dense_every: int = 25
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
        """The steps saved as checkpoints: log-spaced, plus every ``dense_every`` steps over the second half."""
        steps = set(checkpoint_steps(self.steps, self.n_checkpoints))
        if self.dense_every:
            half = self.steps // 2
            steps = {s for s in steps if s < half} | set(range(half, self.steps + 1, self.dense_every)) | {self.steps}
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


# The train fraction whose held-out pairs every demo run is scored on (and the bundled task uses).
EVAL_TRAIN_FRACTION = 0.7

DEMO_RUNS: dict[str, DemoConfig] = {
    "grokking": DemoConfig(
        note="weight decay 1.0, 70% of pairs: memorises first, then held-out accuracy follows",
        weight_decay=1.0,
        train_fraction=0.7,
    ),
    "memorizing": DemoConfig(
        note="weight decay 0, 30% of pairs: the same train loss, held-out accuracy stays near chance",
        weight_decay=0.0,
        train_fraction=0.3,
    ),
}


# What `python -m analysis demo` computes on every demo checkpoint, so each page has data on first
# open: the bundled tasks, held-out loss, per-sample memorisation rows (the answer token only: the
# operands are random and unpredictable), and every internal metric. The top eigenvalue uses Lanczos
# (a few seconds per checkpoint on a CPU instead of most of a minute by power iteration).
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


# ----------------------------------------------------------------------------- data


def split_pairs(p: int, train_fraction: float, seed: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Split all ``p * p`` operand pairs into ``(train, heldout)``, deterministically under ``seed``.

    The split is over unordered pairs: ``(a, b)`` and ``(b, a)`` always land on the same side.
    Otherwise a model that has only memorised its training pairs, and merely learnt that addition
    commutes (which a transformer gets almost for free), answers about half of the held-out pairs,
    and "held-out accuracy" stops measuring generalisation. ``train_fraction`` is the share of
    unordered pairs trained on.

    The unordered pairs are shuffled once and the train set is a prefix of that order, so a smaller
    ``train_fraction`` with the same seed trains on a subset and holds out a superset. Each side is
    then shuffled (the first N pairs are a fair sample). Uses Python's ``random.Random``, whose
    shuffle is stable across platforms and versions, because the bundled task files depend on it.
    """
    if not _is_prime(p):
        raise ValueError(f"split_pairs: p={p} must be a prime")
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"split_pairs: train_fraction={train_fraction} must be in (0, 1)")
    rng = random.Random(seed)
    unordered = [(a, b) for a in range(p) for b in range(a, p)]
    rng.shuffle(unordered)
    n_train = _n_train_unordered(p, train_fraction)
    sides = []
    for group in (unordered[:n_train], unordered[n_train:]):
        pairs = [pair for a, b in group for pair in ({(a, b), (b, a)} if a != b else {(a, b)})]
        pairs.sort()  # sets have no stable order; sort, then shuffle under the seed
        rng.shuffle(pairs)
        sides.append(pairs)
    return sides[0], sides[1]


def eval_pairs(cfg: DemoConfig) -> list[tuple[int, int]]:
    """The held-out pairs behind ``eval/*``, the same for every demo run.

    The first ``cfg.eval_samples`` pairs left out at ``EVAL_TRAIN_FRACTION`` (the first records of
    the bundled ``heldout.jsonl``). Splits are nested, so no demo run trains on them.
    """
    return split_pairs(cfg.p, EVAL_TRAIN_FRACTION, cfg.seed)[1][: cfg.eval_samples]


def task_records(pairs: list[tuple[int, int]], p: int, op: str = "+") -> list[dict]:
    """The task-file records of ``pairs``: a, b, op, prompt ("12 + 40 ="), answer ("52")."""
    fn = OPS[op]
    return [{"a": a, "b": b, "op": op, "prompt": f"{a} {op} {b} =", "answer": str(fn(a, b, p))} for a, b in pairs]


def write_task_files(folder: Path, cfg: DemoConfig) -> tuple[Path, Path]:
    """Write ``train.jsonl`` and ``heldout.jsonl`` of ``cfg``'s split into ``folder``.

    ``data/tasks/modarith/`` is this with ``DEMO_RUNS["grokking"]``, whose held-out pairs no demo
    run trains on (the splits are nested) and whose first ``eval_samples`` held-out pairs are the ones
    behind ``eval/*``. Its ``train.jsonl`` is the grokking run's training set; the memorizing run's is
    the subset ``split_pairs(p, 0.3, seed)[0]``. Returns the two paths.
    """
    folder.mkdir(parents=True, exist_ok=True)
    train, heldout = split_pairs(cfg.p, cfg.train_fraction, cfg.seed)
    paths = []
    for name, pairs in (("train", train), ("heldout", heldout)):
        path = folder / f"{name}.jsonl"
        lines = (json.dumps(rec) for rec in task_records(pairs, cfg.p, cfg.op))
        path.write_text("".join(line + "\n" for line in lines))
        paths.append(path)
    return paths[0], paths[1]


def vocabulary(p: int) -> list[str]:
    """The tokenizer's words: the numbers 0..p-1, every operator and "=" (same for every op)."""
    return [str(i) for i in range(p)] + [*OPS, "="]


def encode_pairs(pairs: list[tuple[int, int]], p: int, op: str, tokenizer) -> torch.Tensor:
    """Token ids of ``<bos> a op b = c <eos>`` for every pair, shape (N, SEQ_LEN).

    Built from the tokenizer's vocabulary directly (one lookup per word) instead of running the
    tokenizer on N strings; a test checks that both give the same ids.
    """
    vocab = tokenizer.get_vocab()
    fn = OPS[op]
    rows = [
        [
            tokenizer.bos_token_id,
            vocab[str(a)],
            vocab[op],
            vocab[str(b)],
            vocab["="],
            vocab[str(fn(a, b, p))],
            vocab[EOS],
        ]
        for a, b in pairs
    ]
    return torch.tensor(rows, dtype=torch.long)  # (N, T)


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


def _batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless index batches: a fresh permutation each epoch, every batch full-sized."""
    batch_size = min(batch_size, n)
    buf = torch.empty(0, dtype=torch.long)
    while True:
        while len(buf) < batch_size:
            buf = torch.cat([buf, torch.randperm(n, generator=generator)])
        yield buf[:batch_size]
        buf = buf[batch_size:]


# ----------------------------------------------------------------------------- model


def build_model(cfg: DemoConfig, vocab_size: int, *, experts_implementation: str = "eager"):
    """A freshly initialised OLMoE for ``cfg`` (initialised from torch's global RNG).

    ``experts_implementation="eager"`` loops over experts: on CPU it trains many times faster than
    the default ``grouped_mm``. It is a runtime choice only, not stored in the saved config, so
    checkpoints load with whatever implementation the loader picks.
    """
    from transformers import OlmoeForCausalLM

    config = tiny_moe_config(
        vocab_size,
        hidden_size=cfg.hidden_size,
        num_layers=cfg.num_layers,
        num_experts=cfg.num_experts,
        top_k=cfg.top_k,
        num_heads=cfg.num_heads,
        max_positions=SEQ_LEN + 1,
    )
    config._experts_implementation = experts_implementation
    return OlmoeForCausalLM(config)


def _token_stats(logits: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sequence answer loss, answer correctness and eos loss from full-sequence logits.

    ``logits`` (B, T-1, V) come from ``ids[:, :-1]`` (the final <eos> predicts nothing, so it is not
    fed) and predict ids shifted by one: the answer is predicted at ANSWER_POS - 1, eos after it.
    """
    ans_logits = logits[:, ANSWER_POS - 1]  # (B, V)
    eos_logits = logits[:, ANSWER_POS]  # (B, V)
    ans_loss = F.cross_entropy(ans_logits.float(), ids[:, ANSWER_POS], reduction="none")  # (B,)
    eos_loss = F.cross_entropy(eos_logits.float(), ids[:, ANSWER_POS + 1], reduction="none")  # (B,)
    correct = (ans_logits.argmax(-1) == ids[:, ANSWER_POS]).float()  # (B,)
    return ans_loss, correct, eos_loss


@torch.no_grad()
def evaluate(model, ids: torch.Tensor, *, batch_size: int = 2048) -> tuple[float, float]:
    """Mean answer-token loss and accuracy of ``model`` over every row of ``ids`` (N, T)."""
    was_training = model.training
    model.eval()
    loss_sum, correct_sum = 0.0, 0.0
    for i in range(0, len(ids), batch_size):
        chunk = ids[i : i + batch_size].to(model.device)
        ans_loss, correct, _ = _token_stats(model(input_ids=chunk[:, :-1]).logits, chunk)
        loss_sum += ans_loss.sum().item()
        correct_sum += correct.sum().item()
    model.train(was_training)
    return loss_sum / len(ids), correct_sum / len(ids)


# ----------------------------------------------------------------------------- training


def _summary(cfg: DemoConfig, model, out_dir: Path, steps: list[int], n_train: int, n_eval: int) -> dict:
    import transformers

    return {
        "name": out_dir.name,
        "kind": "modarith-demo",
        "demo_version": DEMO_VERSION,
        "config": asdict(cfg),
        "task": f"(a {cfg.op} b) mod {cfg.p}",
        "n_train": n_train,  # ordered pairs trained on
        "n_heldout": cfg.p**2 - n_train,  # ordered pairs not trained on
        "n_eval": n_eval,  # the fixed held-out pairs behind eval/* (the same for every demo run)
        "tokens_per_sequence": SEQ_LEN,
        "checkpoint_steps": steps,
        "model": {
            "architecture": type(model).__name__,
            "parameters": sum(p.numel() for p in model.parameters()),
            "hidden_size": cfg.hidden_size,
            "num_layers": cfg.num_layers,
            "num_experts": cfg.num_experts,
            "top_k": cfg.top_k,
            "num_heads": cfg.num_heads,
            "vocab_size": model.config.vocab_size,
        },
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        # CPU kernels split their sums by thread, so the bits of the weights depend on this too.
        "torch_threads": torch.get_num_threads(),
    }


def _marker_text(cfg: DemoConfig) -> str:
    return json.dumps({"demo_version": DEMO_VERSION, **asdict(cfg)}, sort_keys=True)


def is_complete(run_dir: Path, cfg: DemoConfig) -> bool:
    """True when ``run_dir`` holds a finished build of exactly ``cfg`` by this version of the demo."""
    marker = Path(run_dir) / MARKER
    if not marker.is_file():
        return False
    try:
        built = json.loads(marker.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    if not isinstance(built, dict):
        return False
    return built.pop("demo_version", 1) == DEMO_VERSION and built == json.loads(json.dumps(asdict(cfg)))


def train_run(
    cfg: DemoConfig,
    out_dir: Path,
    *,
    progress: Callable[[int, int], None] | None = None,
    device: str | torch.device = "cpu",
    until: int | None = None,
) -> Path:
    """Train one demo run into ``out_dir`` and return it.

    ``until`` stops after that many steps (the checkpoints up to it saved, no ``COMPLETE`` marker):
    the first checkpoints of a run, bit for bit, without training the rest.

    ``out_dir`` must be empty, missing, or an earlier (possibly unfinished) demo run, which is
    replaced. ``progress(step, cfg.steps)`` is called after every step. The same config, device and
    torch thread count give bit-identical weights: init and the split come from ``cfg.seed``, batches
    from a seeded generator, and deterministic algorithms are switched on for the duration. (CPU
    kernels split sums by thread, so another thread count gives weights that differ in the last bits.)
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        if not (out_dir / "run.json").is_file():
            raise ValueError(f"{out_dir}: not empty and not a demo run; pick an empty or missing folder")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)

    tokenizer = build_word_tokenizer(vocabulary(cfg.p))
    train_pairs, _ = split_pairs(cfg.p, cfg.train_fraction, cfg.seed)
    train_ids = encode_pairs(train_pairs, cfg.p, cfg.op, tokenizer).to(device)  # (N_train, T)
    heldout_ids = encode_pairs(eval_pairs(cfg), cfg.p, cfg.op, tokenizer).to(device)  # (N_eval, T)
    save_at = set(cfg.checkpoint_steps())
    if until is not None and not 1 <= until <= cfg.steps:
        raise ValueError(f"until={until} must be in [1, steps={cfg.steps}]")

    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        # fork_rng: seed the init without disturbing the caller's global RNG stream.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(cfg.seed)
            model = build_model(cfg, len(tokenizer)).to(device)
        (out_dir / "run.json").write_text(
            json.dumps(_summary(cfg, model, out_dir, sorted(save_at), len(train_ids), len(heldout_ids)), indent=2)
            + "\n"
        )
        _train_loop(cfg, model, tokenizer, train_ids, heldout_ids, save_at, out_dir, progress, until or cfg.steps)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
    if until is None or until == cfg.steps:
        (out_dir / MARKER).write_text(_marker_text(cfg))  # last: its presence means the run is whole
    return out_dir


def _train_loop(cfg, model, tokenizer, train_ids, heldout_ids, save_at, out_dir, progress, last_step) -> None:
    """The optimisation loop of :func:`train_run`: AdamW, warmup then constant lr, log and save."""
    # Weight decay on matrices only (nanoGPT's rule): decaying norms' gains does not help and
    # only rescales them.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
    )
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    batches = _batches(len(train_ids), cfg.batch_size, generator)
    tokens = 0
    model.train()
    with open(out_dir / "metrics.jsonl", "w") as log:
        for step in range(1, last_step + 1):
            lr = cfg.lr * min(1.0, step / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr
            for group in optimizer.param_groups:
                group["lr"] = lr
            ids = train_ids[next(batches).to(train_ids.device)]  # (B, T)
            ans_loss, correct, eos_loss = _token_stats(model(input_ids=ids[:, :-1]).logits, ids)  # (B,) each
            loss = (ans_loss.mean() + eos_loss.mean()) / 2  # the objective: answer and eos tokens
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            tokens += ids.numel()  # no padding: every sequence is SEQ_LEN tokens

            row = {
                "step": step,
                "tokens": tokens,
                "train/loss": ans_loss.mean().item(),
                "train/accuracy": correct.mean().item(),
                "train/learning_rate": lr,
            }
            if step % cfg.eval_every == 0 or step in save_at:
                row["eval/loss"], row["eval/accuracy"] = evaluate(model, heldout_ids)
            log.write(json.dumps(row) + "\n")
            if step in save_at:
                log.flush()
                _save_checkpoint(model, tokenizer, out_dir / f"step_{step}")
                model.train()
            if progress is not None:
                progress(step, cfg.steps)


def _save_checkpoint(model, tokenizer, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _train_in_child(cfg: DemoConfig, run_dir: str, counter, threads: int) -> str:
    """Process-pool entry: train one run with ``threads`` torch threads, reporting steps in ``counter``."""
    torch.set_num_threads(threads)

    def report(step: int, _steps: int) -> None:
        counter.value = step

    train_run(cfg, Path(run_dir), progress=report)
    return run_dir


def build_demo(
    root: Path,
    *,
    scale: float = 1.0,
    progress: Callable[[int, int], None] | None = None,
    runs: dict[str, DemoConfig] | None = None,
    workers: int | None = None,
) -> list[Path]:
    """Build every demo run under ``root`` (``root/<name>``) and return their folders.

    A run whose folder already holds a ``COMPLETE`` marker for the same (scaled) config is kept as
    is; anything else there, such as an interrupted build, is replaced. ``progress(done, total)``
    counts steps over all runs, skipped runs included, so one bar covers the whole build.

    Runs train side by side in ``workers`` processes (default: one per run, up to the CPU count),
    each with an equal share of the cores: small models use cores poorly within one process, so
    two one-thread runs finish in about half the time of two two-thread runs in a row.
    """
    import multiprocessing as mp
    import os
    import time

    configs = {name: cfg.scaled(scale) for name, cfg in (runs or DEMO_RUNS).items()}
    total = sum(cfg.steps for cfg in configs.values())
    todo = [(name, cfg) for name, cfg in configs.items() if not is_complete(Path(root) / name, cfg)]
    done_before = sum(cfg.steps for name, cfg in configs.items() if (name, cfg) not in todo)
    cores = os.cpu_count() or 1
    workers = max(1, min(len(todo), cores) if workers is None else workers)
    if progress is not None:
        progress(done_before, total)
    if workers == 1:
        offset = done_before
        for name, cfg in todo:

            def run_progress(step: int, _steps: int, offset: int = offset) -> None:
                if progress is not None:
                    progress(offset + step, total)

            train_run(cfg, Path(root) / name, progress=run_progress)
            offset += cfg.steps
    elif todo:
        ctx = mp.get_context("spawn")  # a clean interpreter: no inherited torch thread pools
        threads = max(1, cores // workers)
        pending = list(todo)
        running: list[tuple[mp.process.BaseProcess, Synchronized[int], str]] = []
        finished = 0
        while pending or running:
            while pending and len(running) < workers:
                name, cfg = pending.pop(0)
                counter = ctx.Value("i", 0)
                child = ctx.Process(target=_train_in_child, args=(cfg, str(Path(root) / name), counter, threads))
                child.start()
                running.append((child, counter, name))
            for proc, counter, name in list(running):
                if not proc.is_alive():
                    proc.join()
                    if proc.exitcode != 0:
                        for other, _, _ in running:
                            other.terminate()
                        raise RuntimeError(
                            f"demo run {name!r} failed (exit code {proc.exitcode}); see the output above"
                        )
                    finished += configs[name].steps
                    running.remove((proc, counter, name))
            if progress is not None:
                progress(done_before + finished + sum(c.value for _, c, _ in running), total)
            time.sleep(0.5)
    if progress is not None:
        progress(total, total)
    return [Path(root) / name for name in configs]


__all__ = [
    "DEMO_RUNS",
    "TASK_DIR",
    "DemoConfig",
    "build_demo",
    "checkpoint_steps",
    "eval_pairs",
    "split_pairs",
    "train_run",
    "write_task_files",
]
