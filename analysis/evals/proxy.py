"""Token-level proxy metrics over expert-written solutions.

One teacher-forced pass over prompt + solution; every statistic is taken over the solution's
tokens only, each predicted from the logits one position earlier, in fp32:

- ``cross_entropy``: -log p(expert token)
- ``topK_accuracy`` (K = 1, 2, 3, 5): expert rank <= K
- ``expert_rank``: 1 + number of vocabulary tokens with strictly higher probability (1 = top;
  ties count in the expert's favour) and ``reciprocal_rank``: 1 / rank
- ``normalized_entropy``: entropy of the predicted distribution / ln(vocabulary size)
- ``margin``: p(top-1) - p(expert), 0 when the expert token is the top one
- ``wrong_confidence``: p(top-1) over the tokens whose rank is > 1 only; an item with no such
  token has no value and is left out of that statistic's mean

Aggregation: each item (one solution) gets the mean of each statistic over its tokens, and the
reported value is the mean over items, with stderr = sample std over items / sqrt(n). Items
count equally, as problems do in downstream accuracy. With ``weighting="inverse_frequency"``
the per-item mean is weighted by 1 / (count of that token id among all solution tokens of the
call), normalised to sum to 1 within the item, so frequent filler tokens count less.

Tokenisation follows lm-eval: prompt + delimiter + solution is encoded whole and the solution
tokens are what follows the prompt's own encoding (the split lm-eval uses to score a
continuation), falling back to encoding the two parts separately when the tokenizer merges
across the boundary.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from analysis.evals.heldout import model_device, right_pad

STATISTICS = (
    "cross_entropy",
    "top1_accuracy",
    "top2_accuracy",
    "top3_accuracy",
    "top5_accuracy",
    "expert_rank",
    "reciprocal_rank",
    "normalized_entropy",
    "margin",
    "wrong_confidence",
)
# For the metric registry: which direction is better for each proxy_<statistic>.
HIGHER_IS_BETTER = {
    "proxy_cross_entropy": False,
    "proxy_top1_accuracy": True,
    "proxy_top2_accuracy": True,
    "proxy_top3_accuracy": True,
    "proxy_top5_accuracy": True,
    "proxy_expert_rank": False,
    "proxy_reciprocal_rank": True,
    "proxy_normalized_entropy": False,
    "proxy_margin": False,
    "proxy_wrong_confidence": False,
}
Weighting = Literal["uniform", "inverse_frequency"]


@dataclass(frozen=True)
class ProxyResult:
    """One proxy statistic over a set of items."""

    value: float | None  # mean over items; None when no item has a value (wrong_confidence, all right)
    stderr: float | None  # sample std over items / sqrt(n); None for n < 2
    n: int  # items with a value
    weighting: str
    per_item: tuple[float | None, ...] = ()


def encode_item(tokenizer: Any, prompt: str, solution: str, delimiter: str = " ") -> tuple[list[int], int]:
    """Token ids of prompt + delimiter + solution and how many of them are the prompt."""
    whole = list(tokenizer(prompt + delimiter + solution)["input_ids"])
    context = list(tokenizer(prompt)["input_ids"])
    if len(whole) > len(context) and whole[: len(context)] == context:
        return whole, len(context)
    tail = list(tokenizer(delimiter + solution, add_special_tokens=False)["input_ids"])
    return context + tail, len(context)


def token_statistics(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-token statistics from next-token logits (N, V) and expert token ids (N,).

    Returns float tensors of shape (N,), keyed as :data:`STATISTICS`, plus ``wrong`` (bool):
    whether the top-1 token is not the expert's. ``wrong_confidence`` is p(top-1) on every
    token; the caller keeps it only where ``wrong`` holds.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)  # (N, V)
    probs = logp.exp()
    expert_logp = logp.gather(1, targets[:, None]).squeeze(1)  # (N,)
    rank = 1 + (logp > expert_logp[:, None]).sum(dim=1)  # strict: ties favour the expert
    # 0 * log 0 = 0: tokens with -inf logits contribute nothing to the entropy.
    entropy = -torch.where(probs > 0, probs * logp, torch.zeros_like(probs)).sum(dim=1)
    top1 = probs.max(dim=1).values
    stats = {
        "cross_entropy": -expert_logp,
        "expert_rank": rank.float(),
        "reciprocal_rank": 1.0 / rank.float(),
        "normalized_entropy": entropy / math.log(logits.shape[-1]),
        "margin": top1 - expert_logp.exp(),
        "wrong_confidence": top1,
        "wrong": rank > 1,
    }
    for k in (1, 2, 3, 5):
        stats[f"top{k}_accuracy"] = (rank <= k).float()
    return stats


def _weighted_mean(values: Sequence[float], weights: Sequence[float]) -> float | None:
    total = sum(weights)
    if not values or total <= 0:
        return None
    return sum(v * w for v, w in zip(values, weights, strict=True)) / total


@torch.no_grad()
def proxy_metrics(
    model: torch.nn.Module,
    tokenizer: Any,
    items: list[tuple[str, str]],
    *,
    batch_size: int = 16,
    device: str | torch.device | None = None,
    weighting: Weighting = "uniform",
    delimiter: str = " ",
) -> dict[str, ProxyResult]:
    """Proxy statistics of the model on (prompt, expert solution) items, keyed ``proxy_<statistic>``.

    See the module docstring for definitions. The model is called as
    ``model(input_ids=..., attention_mask=...)`` and must return an object with ``.logits``.
    """
    if weighting not in ("uniform", "inverse_frequency"):
        raise ValueError(f"weighting must be 'uniform' or 'inverse_frequency', got {weighting!r}")
    if not items:
        raise ValueError("no items; pass at least one (prompt, solution) pair")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    where = model_device(model, device)
    encoded = []
    for index, (prompt, solution) in enumerate(items):
        ids, n_prompt = encode_item(tokenizer, prompt, solution, delimiter)
        if len(ids) <= n_prompt:
            raise ValueError(f"item {index}: solution {solution!r} encodes to no tokens; give every item a solution")
        if n_prompt < 1:
            raise ValueError(f"item {index}: the prompt encodes to no tokens; the first solution token needs a context")
        encoded.append((ids, n_prompt))

    # Per item: the list of per-token statistic values, and the expert token ids.
    per_token: list[dict[str, list[float]]] = [{} for _ in encoded]
    expert_ids: list[list[int]] = [ids[n:] for ids, n in encoded]
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start : start + batch_size]
            padded, mask = right_pad([c[0] for c in chunk])
            logits = model(input_ids=padded.to(where), attention_mask=mask.to(where)).logits  # (B, T, V)
            rows, cols = [], []
            for b, (seq, n_prompt) in enumerate(chunk):
                for pos in range(n_prompt, len(seq)):
                    rows.append(b)
                    cols.append(pos - 1)  # logits at pos - 1 predict the token at pos
            picked = logits[torch.tensor(rows), torch.tensor(cols)]  # (N, V)
            targets = padded[torch.tensor(rows), torch.tensor(cols) + 1].to(picked.device)
            stats = {k: v.detach().cpu().tolist() for k, v in token_statistics(picked, targets).items()}
            offset = 0
            for b, (seq, n_prompt) in enumerate(chunk):
                n = len(seq) - n_prompt
                per_token[start + b] = {k: v[offset : offset + n] for k, v in stats.items()}
                offset += n
    finally:
        model.train(was_training)

    counts = Counter(t for sol in expert_ids for t in sol)
    results: dict[str, ProxyResult] = {}
    for stat in STATISTICS:
        per_item: list[float | None] = []
        for sol, values in zip(expert_ids, per_token, strict=True):
            weights = [1.0 / counts[t] if weighting == "inverse_frequency" else 1.0 for t in sol]
            xs = values[stat]
            if stat == "wrong_confidence":
                keep = [i for i, wrong in enumerate(values["wrong"]) if wrong]
                xs = [xs[i] for i in keep]
                weights = [weights[i] for i in keep]
            per_item.append(_weighted_mean(xs, weights))
        present = [v for v in per_item if v is not None]
        value = sum(present) / len(present) if present else None
        stderr = None
        if len(present) > 1 and value is not None:
            var = sum((v - value) ** 2 for v in present) / (len(present) - 1)
            stderr = math.sqrt(var / len(present))
        results[f"proxy_{stat}"] = ProxyResult(
            value=value, stderr=stderr, n=len(present), weighting=weighting, per_item=tuple(per_item)
        )
    return results
