"""Training the demo runs: one run into a folder (checkpoints, logs, the completion marker), and every
run side by side in worker processes."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path

import torch

from analysis import demo as package
from analysis.demo.config import DEMO_RUNS, MARKER, SEQ_LEN, DemoConfig
from analysis.demo.data import encode_pairs, eval_pairs, split_pairs, vocabulary
from analysis.demo.model import _token_stats, build_model, evaluate
from analysis.models import build_word_tokenizer


def _batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless index batches: a fresh permutation each epoch, every batch full-sized."""
    batch_size = min(batch_size, n)
    buf = torch.empty(0, dtype=torch.long)
    while True:
        while len(buf) < batch_size:
            buf = torch.cat([buf, torch.randperm(n, generator=generator)])
        yield buf[:batch_size]
        buf = buf[batch_size:]


def _summary(cfg: DemoConfig, model, out_dir: Path, steps: list[int], n_train: int, n_eval: int) -> dict:
    import transformers

    return {
        "name": out_dir.name,
        "kind": "modarith-demo",
        "demo_version": package.DEMO_VERSION,
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
    return json.dumps({"demo_version": package.DEMO_VERSION, **asdict(cfg)}, sort_keys=True)


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
    return built.pop("demo_version", 1) == package.DEMO_VERSION and built == json.loads(json.dumps(asdict(cfg)))


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


def _train_in_child(cfg: DemoConfig, run_dir: str, threads: int, counter) -> str:
    """Child-process entry: train one run with ``threads`` torch threads, reporting steps in ``counter``."""
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
    import os

    configs = {name: cfg.scaled(scale) for name, cfg in (runs or DEMO_RUNS).items()}
    total = sum(cfg.steps for cfg in configs.values())
    todo = [(name, cfg) for name, cfg in configs.items() if not is_complete(Path(root) / name, cfg)]
    done_before = sum(cfg.steps for name, cfg in configs.items() if (name, cfg) not in todo)
    cores = os.cpu_count() or 1
    workers = max(1, min(len(todo), cores) if workers is None else workers)
    if progress is not None:
        progress(done_before, total)
    if workers == 1:
        _train_in_turn(todo, Path(root), done_before, total, progress)
    elif todo:
        _train_side_by_side(todo, Path(root), workers, max(1, cores // workers), done_before, total, progress)
    if progress is not None:
        progress(total, total)
    return [Path(root) / name for name in configs]


def _train_in_turn(
    todo: list[tuple[str, DemoConfig]],
    root: Path,
    done_before: int,
    total: int,
    progress: Callable[[int, int], None] | None,
) -> None:
    """:func:`build_demo` in this process: the runs of ``todo`` one after the other."""
    offset = done_before
    for name, cfg in todo:

        def run_progress(step: int, _steps: int, offset: int = offset) -> None:
            if progress is not None:
                progress(offset + step, total)

        train_run(cfg, root / name, progress=run_progress)
        offset += cfg.steps


def _train_side_by_side(
    todo: list[tuple[str, DemoConfig]],
    root: Path,
    workers: int,
    threads: int,
    done_before: int,
    total: int,
    progress: Callable[[int, int], None] | None,
) -> None:
    """:func:`build_demo` in ``workers`` child processes of ``threads`` torch threads each; one failing stops all."""
    from analysis.demo.processes import side_by_side

    children = [(name, _train_in_child, (cfg, str(root / name), threads)) for name, cfg in todo]
    report = None if progress is None else (lambda steps: progress(done_before + steps, total))
    side_by_side(children, workers, progress=report)
