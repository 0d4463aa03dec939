"""Reading the router of a mixture-of-experts model: per-token routing weights and per-sample profiles.

One forward pass per batch gives every MoE layer's router softmax; :func:`routing_profile`
keeps, per sample, what the routing metrics need (token-averaged weights, entropy sums,
top-k counts, the router weight matrices), so every pathway metric and every memorisation
group is scored from a :class:`RoutingProfile` without running the model again.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from analysis.metrics.common import Batch, check_batches, to_device, working_model


@dataclass(frozen=True)
class RoutingConfig:
    """Routing metrics without parameters (consistency, entropy, load)."""


def _model_type(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) or type(model).__name__


def _not_moe(model: nn.Module) -> ValueError:
    return ValueError(f"this metric needs a mixture-of-experts model (router logits); {_model_type(model)} has none")


def _num_experts(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for key in ("num_experts", "num_local_experts", "n_routed_experts"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _device_of(model: nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


@torch.no_grad()
def capture_routing(model: nn.Module, batch: Batch) -> list[torch.Tensor]:
    """Router softmax weights of every MoE layer, (B, T, E) float32, padding positions zero.

    Uses ``output_router_logits=True``, which returns one (B*T, E) logit tensor per MoE
    layer with padding positions included; they are reshaped and masked here. The batch
    is moved to the model's device. Raises ValueError for a model without a router.
    """
    return _routing_forward(model, batch)[0]


def _routing_forward(model: nn.Module, batch: Batch) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """:func:`capture_routing`'s weights and the same forward pass's token logits (B, T, V), or None."""
    if _num_experts(model) is None:
        raise _not_moe(model)
    batch = to_device(batch, _device_of(model))
    ids = batch["input_ids"]  # (B, T)
    mask = batch.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(ids)
    out = model(input_ids=ids, attention_mask=mask, output_router_logits=True, use_cache=False)
    logits = getattr(out, "router_logits", None)
    if not logits:
        raise _not_moe(model)
    return _router_probs(logits, mask, _model_type(model)), getattr(out, "logits", None)


def _router_probs(logits: Sequence[torch.Tensor], mask: torch.Tensor, model_type: str) -> list[torch.Tensor]:
    """Per MoE layer, the router softmax (B, T, E) float32 from its (B*T, E) logits, zero on padding."""
    b, t = mask.shape
    weights = []
    for layer_logits in logits:
        if layer_logits.shape[0] != b * t:
            raise ValueError(
                f"router logits of {model_type} have {layer_logits.shape[0]} rows for a {b}x{t} batch; "
                "expected one row per position (padding included)"
            )
        probs = torch.softmax(layer_logits.float(), dim=-1).view(b, t, -1)  # (B, T, E)
        weights.append(probs * mask[..., None].to(probs.dtype))
    return weights


def _token_nll(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """NLL of each predicted token (B, T-1), float64, NaN where the target is padding."""
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none"
    ).double()  # (B, T-1)
    return torch.where(mask[:, 1:].bool(), nll, torch.full_like(nll, math.nan))


def router_weights(model: nn.Module, n_layers: int, n_experts: int) -> list[torch.Tensor]:
    """The router weight matrices (E, H) of the MoE layers, in layer order.

    Routers are the modules whose outputs transformers records as router logits
    (``_can_record_outputs["router_logits"]``: OlmoeTopKRouter, MixtralTopKRouter, ...);
    failing that, modules named ``*.gate``/``*.router`` with an (E, H) weight.
    """
    recorder = getattr(type(model), "_can_record_outputs", None) or {}
    target = getattr(recorder.get("router_logits"), "target_class", None)
    found = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[0] != n_experts:
            continue
        by_class = target is not None and isinstance(module, target)
        by_name = target is None and (name.endswith(".gate") or name.endswith(".router"))
        if by_class or by_name:
            found.append(weight)
    if len(found) != n_layers:
        raise ValueError(
            f"found {len(found)} router weight matrices in {_model_type(model)} for {n_layers} MoE layers; "
            "pathway_consistency needs one (experts x hidden) router weight per MoE layer"
        )
    return found


@dataclass(frozen=True)
class RoutingProfile:
    """Per-sample routing of one model on a probe set: everything the routing metrics need."""

    weights: np.ndarray  # (N, L, E) token-averaged router softmax, float64
    entropy_sums: np.ndarray  # (N, L) sum over the sample's tokens of entropy / ln E
    n_tokens: np.ndarray  # (N,) real tokens per sample
    topk_counts: np.ndarray  # (N, L, E) tokens of the sample whose top-k includes the expert
    top_k: int
    routers: tuple[np.ndarray, ...] | None  # per layer (E, H), float64; None where not found
    model_type: str
    token_nll: np.ndarray | None = None  # (N, T-1) NLL of each predicted token, NaN on padding (keep_nll)

    @property
    def n_samples(self) -> int:
        return int(self.weights.shape[0])


def routing_profile(
    model: nn.Module, batches: Sequence[Batch], *, device: torch.device | str = "cpu", keep_nll: bool = False
) -> RoutingProfile:
    """Run the model once over ``batches`` and keep per-sample routing statistics.

    Sample i of the profile is the i-th row over the batches in order, so indices line
    up with per-sample losses (memorisation groups). With ``keep_nll`` the same forward
    pass also gives each sample's per-token loss. Raises ValueError for a dense model or a
    sample without any real token.
    """
    check_batches(batches)
    if _num_experts(model) is None:
        raise _not_moe(model)
    top_k = getattr(getattr(model, "config", None), "num_experts_per_tok", None)
    if not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"{_model_type(model)} config has no num_experts_per_tok; expert_load needs the router's k")
    weights: list[torch.Tensor] = []  # per batch (B, L, E)
    entropies: list[torch.Tensor] = []  # (B, L)
    counts: list[torch.Tensor] = []  # (B,)
    topk: list[torch.Tensor] = []  # (B, L, E)
    nlls: list[torch.Tensor] = []  # (B, T-1)
    with working_model(model, device, upcast=False) as work, torch.no_grad():
        for batch in batches:
            mask = batch.get("attention_mask")
            if mask is None:
                mask = torch.ones_like(batch["input_ids"])
            mask = mask.to(device)
            layers, logits = _routing_forward(work, batch)  # L x (B, T, E), (B, T, V)
            if keep_nll:
                if logits is None:
                    raise ValueError(f"{_model_type(model)} returned no token logits; per-sample loss needs them")
                nlls.append(_token_nll(logits, batch["input_ids"].to(mask.device), mask).cpu())
            mean_weights, entropy_sums, topk_counts, n = _sample_statistics(
                layers, mask, top_k, first=sum(len(c) for c in counts)
            )
            weights.append(mean_weights)
            entropies.append(entropy_sums)
            topk.append(topk_counts)
            counts.append(n)
        n_layers, n_experts = weights[-1].shape[1:]
        routers: tuple[np.ndarray, ...] | None
        try:
            routers = tuple(w.detach().double().cpu().numpy() for w in router_weights(work, n_layers, n_experts))
        except ValueError:
            routers = None
    return RoutingProfile(
        weights=torch.cat(weights).cpu().numpy(),
        entropy_sums=torch.cat(entropies).cpu().numpy(),
        n_tokens=torch.cat(counts).cpu().numpy().astype(np.int64),
        topk_counts=torch.cat(topk).cpu().numpy(),
        top_k=top_k,
        routers=routers,
        model_type=_model_type(model),
        token_nll=_pad_rows(nlls) if keep_nll else None,
    )


def _sample_statistics(
    layers: list[torch.Tensor], mask: torch.Tensor, top_k: int, first: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One batch's per-sample routing statistics, float64, from its router weights L x (B, T, E) and mask (B, T).

    Returns the token-averaged weights (B, L, E), the sums over real tokens of entropy / ln E
    (B, L), the top-k counts (B, L, E) and the real tokens per sample (B,). ``first`` is the
    index of the batch's first sample in the probe set, for the error on a sample without
    any real token.
    """
    probs = torch.stack(layers, dim=1).double()  # (B, L, T, E)
    n_experts = probs.shape[-1]
    real = mask.bool()[:, None, :, None]  # (B, 1, T, 1)
    n = mask.sum(dim=1).double()  # (B,)
    if bool((n == 0).any()):
        row = int((n == 0).nonzero()[0, 0])
        raise ValueError(
            f"sample {first + row} has no real token (attention_mask all 0); drop empty samples from the probe set"
        )
    mean_weights = probs.sum(dim=2) / n[:, None, None]  # (B, L, E)
    plogp = torch.where(probs > 0, probs * probs.log(), torch.zeros_like(probs))
    ent = -plogp.sum(dim=-1) / math.log(n_experts) if n_experts > 1 else plogp.sum(dim=-1) * 0
    chosen = torch.zeros_like(probs).scatter_(-1, probs.topk(min(top_k, n_experts), dim=-1).indices, 1.0)
    # Entropy sums (B, L): padding rows are all-zero, entropy 0. Top-k counts (B, L, E) over real tokens only.
    return mean_weights, ent.sum(dim=2), (chosen * real).sum(dim=2), n


def _pad_rows(parts: list[torch.Tensor]) -> np.ndarray:
    """Stack (B_i, T_i) float tensors into (sum B_i, max T_i), NaN-padded on the right."""
    width = max(p.shape[1] for p in parts)
    out = np.full((sum(p.shape[0] for p in parts), width), np.nan)
    row = 0
    for part in parts:
        out[row : row + part.shape[0], : part.shape[1]] = part.numpy()
        row += part.shape[0]
    return out


def sample_indices(profile: RoutingProfile, indices: Sequence[int] | np.ndarray | None) -> np.ndarray:
    """The profile rows of a group: ``indices`` as an int64 array (every sample when None).

    Raises ValueError for an index outside the profile.
    """
    if indices is None:
        return np.arange(profile.n_samples)
    idx = np.asarray(indices, dtype=np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= profile.n_samples):
        raise ValueError(f"sample indices must lie in 0..{profile.n_samples - 1}")
    return idx
