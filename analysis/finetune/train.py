"""Fine-tune a copy of a loaded checkpoint: LoRA adapters through peft (merged afterwards) or every weight.

The caller's model is never touched: the copy is trained in fp32 master weights on the model's own device
(with bf16 autocast on a CUDA device that supports it) and handed back merged, in eval mode, in the
original dtype, so it is scored exactly as the untuned checkpoint is.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from analysis.finetune.config import FinetuneConfig
from analysis.finetune.data import Example

if TYPE_CHECKING:
    from peft import PeftModel


@dataclass
class Finetuned:
    """A fine-tuned copy and how its training went."""

    model: torch.nn.Module
    losses: list[float]  # training loss of every step

    @property
    def final_loss(self) -> float:
        """Mean training loss over the last 10 steps (or all, when fewer)."""
        tail = self.losses[-10:]
        return float(sum(tail) / len(tail))


def lr_factor(step: int, cfg: FinetuneConfig) -> float:
    """Learning-rate multiplier at update ``step`` (1-based): linear warmup, then the schedule."""
    warmup = min(cfg.warmup_steps, cfg.steps)
    if warmup and step <= warmup:
        return step / warmup
    if cfg.schedule == "constant" or cfg.steps == warmup:
        return 1.0
    done = (step - warmup) / (cfg.steps - warmup)
    if cfg.schedule == "linear":
        return max(0.0, 1.0 - done)
    return 0.5 * (1.0 + math.cos(math.pi * done))


def _batch(examples: list[Example], index: torch.Tensor, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input ids, attention mask and labels (-100 except on target tokens) of some examples."""
    seqs = [examples[i].prompt_ids + examples[i].target_ids for i in index.tolist()]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    for row, i in enumerate(index.tolist()):
        ex = examples[i]
        n_prompt, n = len(ex.prompt_ids), len(ex.prompt_ids) + len(ex.target_ids)
        ids[row, :n] = torch.tensor(seqs[row])
        mask[row, :n] = 1
        labels[row, n_prompt:n] = torch.tensor(ex.target_ids)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def target_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of the target tokens (labels shifted by one; -100 ignored), in fp32.

    Computed from the logits rather than the model's own ``loss``, which for mixture-of-experts models
    may add a router load-balancing term.
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
    return F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1), ignore_index=-100
    )


def _lora(model: torch.nn.Module, cfg: FinetuneConfig) -> PeftModel:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=cfg.lora_r,
        # peft annotates lora_alpha as int, but only divides by it (scaling = alpha / r): a float works the same.
        lora_alpha=cfg.lora_alpha,  # type: ignore[arg-type]
        lora_dropout=0.0,
        bias="none",
        target_modules=cfg.targets,
    )
    try:
        return get_peft_model(model, config)
    except ValueError as err:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"LoRA target modules {cfg.target_modules!r} match no module of this checkpoint ({first[:160]}); "
            f"set finetune.target_modules to some of {', '.join(linear[:12]) or 'its linear layers'}, or all-linear"
        ) from None


def fine_tune(
    model: torch.nn.Module,
    examples: list[Example],
    cfg: FinetuneConfig,
    *,
    seed: int,
    pad_id: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> Finetuned:
    """Fine-tune a copy of ``model`` on ``examples`` with ``cfg``; ``model`` itself is left as it was.

    Batches of ``cfg.batch_size`` examples drawn without replacement within an epoch (a generator seeded by
    ``seed``, which also seeds the adapters' initialisation); AdamW with the schedule of :func:`lr_factor`;
    the global gradient norm clipped at ``cfg.grad_clip``. A non-finite loss stops with a ValueError naming
    the step: a diverging fine-tune gives no numbers. ``progress(step, cfg.steps)`` follows the updates.
    """
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    work = copy.deepcopy(model).to(torch.float32)  # fp32 master weights, whatever the checkpoint's dtype
    lora: PeftModel | None = None
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        if cfg.method == "lora":
            lora = _lora(work, cfg)
            work = lora
        else:
            for param in work.parameters():
                param.requires_grad_(True)
    params = [p for p in work.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    flat = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": flat, "weight_decay": 0.0}], lr=cfg.lr
    )
    autocast = device.type == "cuda" and torch.cuda.is_bf16_supported()
    generator = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    size = min(cfg.batch_size, len(examples))
    losses: list[float] = []
    work.train()
    for step in range(1, cfg.steps + 1):
        while len(order) < size:
            order = torch.cat([order, torch.randperm(len(examples), generator=generator)])
        index, order = order[:size], order[size:]
        batch = {k: v.to(device) for k, v in _batch(examples, index, pad_id).items()}
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * lr_factor(step, cfg)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = target_loss(work, batch)
        if not torch.isfinite(loss):
            raise ValueError(
                f"fine-tuning diverged at step {step} of {cfg.steps} (loss {loss.item()}); "
                f"lower finetune.lr (now {cfg.lr:g}) or use finetune.method=lora"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        losses.append(float(loss.detach()))
        if progress is not None:
            progress(step, cfg.steps)
    if lora is not None:
        work = lora.merge_and_unload()
    if not all(torch.isfinite(p).all() for p in work.parameters()):
        raise ValueError(
            f"fine-tuning diverged: non-finite weights after {cfg.steps} steps; lower finetune.lr (now {cfg.lr:g})"
        )
    for param in work.parameters():
        param.requires_grad_(False)
    work = work.to(dtype)
    work.eval()
    return Finetuned(model=work, losses=losses)
