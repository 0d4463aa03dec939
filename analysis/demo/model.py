"""The demo's model: a freshly initialised tiny OLMoE, and its answer-token loss and accuracy."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from analysis.demo.config import ANSWER_POS, SEQ_LEN, DemoConfig
from analysis.models import tiny_moe_config


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
