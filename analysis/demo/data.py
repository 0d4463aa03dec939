"""The demo's data: the nested train/held-out split of the operand pairs, the bundled task files written
from it, the tokenizer's vocabulary, and the token ids the trainer and evaluation read."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from analysis.demo.config import EVAL_TRAIN_FRACTION, OPS, DemoConfig, _is_prime, _n_train_unordered
from analysis.models import EOS

# The package sits at analysis/demo/, so the project root is two folders above this file's folder.
TASK_DIR = Path(__file__).resolve().parents[2] / "data" / "tasks" / "modarith"


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
