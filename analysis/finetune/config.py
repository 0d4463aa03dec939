"""Settings of the fine-tune probe, validated on creation, and the cache parameters of its job item.

Every setting that shapes a result is in the cache key (``item_params``); ``keep`` (where to save the
fine-tuned copies) is not: it changes no number.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, fields
from pathlib import Path

# Bump when the probe changes what it reports, so cached rows are recomputed.
VERSION = "1"
METHODS = ("lora", "full")
SCHEDULES = ("constant", "linear", "cosine")


@dataclass(frozen=True)
class FinetuneConfig:
    """One fine-tune setting, the same for every checkpoint of a comparison."""

    task: str  # bundled task, lm-eval task name, task YAML path, or a folder with train.jsonl + test.jsonl
    method: str = "lora"  # "lora": peft adapters, merged into a copy afterwards; "full": every weight
    steps: int = 100  # optimizer updates
    lr: float = 1e-3  # AdamW peak learning rate (LoRA likes ~1e-3; full fine-tuning ~1e-4)
    schedule: str = "cosine"  # after the linear warmup: constant, linear or cosine decay to 0
    warmup_steps: int = 10  # linear warmup (cut to ``steps`` when longer)
    batch_size: int = 32  # training examples per update
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max global gradient norm (0: off)
    seed: int = 0  # batch order and adapter init; seeds > 1 runs seed, seed+1, ...
    seeds: int = 1  # fine-tunes per checkpoint; the spread over them goes into the stderr
    target_modules: str = "all-linear"  # LoRA: peft's target_modules, comma-separated names or "all-linear"
    lora_r: int = 8
    lora_alpha: float = 16.0
    limit: int | None = 200  # test documents scored before and after (None: all)
    score: str | None = None  # the task's lm-eval metric key ("acc,none"); None: the task's first
    other_tasks: tuple[str, ...] = ()  # tasks whose change measures forgetting besides held-out loss
    max_length: int = 64  # tokens per training example (the prompt is cut from the left)

    def __post_init__(self) -> None:
        problems = []
        if not self.task:
            problems.append("task is empty: pass --param finetune.task=TASK (e.g. modsub)")
        if self.method not in METHODS:
            problems.append(f"method={self.method!r}: use {' or '.join(METHODS)}")
        if self.schedule not in SCHEDULES:
            problems.append(f"schedule={self.schedule!r}: use {', '.join(SCHEDULES)}")
        for name in ("steps", "batch_size", "seeds", "lora_r"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be >= 1")
        if self.warmup_steps < 0:
            problems.append(f"warmup_steps={self.warmup_steps} must be >= 0")
        if not self.lr > 0 or self.weight_decay < 0 or self.grad_clip < 0 or not self.lora_alpha > 0:
            problems.append("lr and lora_alpha must be > 0, weight_decay and grad_clip >= 0")
        if self.limit is not None and self.limit < 1:
            problems.append(f"limit={self.limit} must be >= 1")
        if self.max_length < 2:
            problems.append(f"max_length={self.max_length} must be >= 2")
        if not self.target_modules.strip():
            problems.append("target_modules is empty: name modules, or use all-linear")
        if problems:
            raise ValueError("finetune: " + "; ".join(problems))

    @property
    def targets(self) -> str | list[str]:
        """peft's ``target_modules``: the string "all-linear" or a list of module names."""
        names = [t.strip() for t in self.target_modules.split(",") if t.strip()]
        return "all-linear" if names == ["all-linear"] else names

    def describe(self) -> str:
        """One line for the page: the settings every checkpoint was fine-tuned with."""
        how = f"LoRA r={self.lora_r} on {self.target_modules}" if self.method == "lora" else "full fine-tuning"
        seeds = f", {self.seeds} seeds" if self.seeds > 1 else ""
        return (
            f"{how}, {self.steps} steps, lr {self.lr:g} ({self.schedule}, warmup {self.warmup_steps}), "
            f"batch {self.batch_size}, seed {self.seed}{seeds}"
        )


_INTS = {"steps", "warmup_steps", "batch_size", "seed", "seeds", "lora_r", "max_length"}
_FLOATS = {"lr", "weight_decay", "grad_clip", "lora_alpha"}
NOT_KEYED = ("keep",)  # settings that change no number: left out of the cache key


def parse_config(given: dict[str, str], *, max_length: int = 64) -> FinetuneConfig:
    """A FinetuneConfig from ``--param finetune.KEY=VALUE`` strings; one-line ValueError on a bad one."""
    known = {f.name for f in fields(FinetuneConfig)}
    values: dict = {"max_length": max_length}
    for key, raw in given.items():
        if key in NOT_KEYED:
            continue
        if key not in known:
            import difflib

            close = difflib.get_close_matches(key, sorted(known | set(NOT_KEYED)), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(f"finetune has no setting {key!r}; {hint}it takes {', '.join(sorted(known))}, keep")
        raw = str(raw).strip()
        try:
            if key in _INTS:
                values[key] = int(raw)
            elif key in _FLOATS:
                values[key] = float(raw)
            elif key == "limit":
                values[key] = None if raw.lower() in ("", "none", "all") else int(raw)
            elif key == "other_tasks":
                values[key] = tuple(t.strip() for t in raw.split(",") if t.strip())
            elif key == "score":
                values[key] = raw or None
            else:
                values[key] = raw
        except ValueError:
            raise ValueError(f"finetune.{key}={raw!r}: not a number; pass e.g. finetune.{key}=10") from None
    if "task" not in values:
        raise ValueError("finetune needs a task: pass --param finetune.task=TASK (a bundled task, a task YAML, "
                         "or a folder with train.jsonl and test.jsonl)")  # fmt: skip
    return FinetuneConfig(**values)


def item_params(cfg: FinetuneConfig, probe: dict) -> dict:
    """The cache parameters of one fine-tune item: every setting, the task data's digest, the probe set's."""
    from analysis.finetune.data import task_digest

    params = asdict(cfg)
    params["other_tasks"] = list(cfg.other_tasks)
    params["task_digest"] = task_digest(cfg.task)
    params["other_digests"] = [task_digest(t) for t in cfg.other_tasks]
    params["version"] = VERSION
    return {**params, **probe}


def config_from_params(params: dict) -> FinetuneConfig:
    """The FinetuneConfig an item's stored parameters describe (for the page's caption)."""
    names = {f.name for f in dataclasses.fields(FinetuneConfig)}
    values = {k: v for k, v in params.items() if k in names}
    values["other_tasks"] = tuple(values.get("other_tasks") or ())
    return FinetuneConfig(**values)


def keep_folder(keep: str | None, run: str, step: int, params_hash: str, checkpoint: str) -> Path | None:
    """Where the fine-tuned copy of one checkpoint goes under ``--keep DIR``, or None when not kept.

    Refuses a folder inside the checkpoint's own run folder: fine-tuned weights never go next to the
    user's checkpoints (a later add-run would take them for checkpoints).
    """
    if not keep:
        return None
    root = Path(keep).expanduser().resolve()
    run_root = Path(checkpoint).resolve().parent
    if root == run_root or run_root in root.parents:
        raise ValueError(
            f"--keep {keep}: inside the run folder {run_root}; keep fine-tuned copies elsewhere (another --keep DIR)"
        )
    return root / run / f"step_{step}" / params_hash
