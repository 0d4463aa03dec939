"""Expert-routing pathways of mixture-of-experts models, and memorisation groups.

Definitions (DESIGN.md, "Grokking / pathways"):

- g_l: for one sample and MoE layer l, the router's softmax weights averaged over the
  sample's real tokens (attention_mask == 1), a vector over the E experts.
- Pathway: per layer, experts ranked by g_l (descending; ties by lower expert id), cut
  at the smallest prefix whose summed weight is >= the threshold (default 0.7; a 1e-9
  slack absorbs float rounding, so a threshold of 1.0 keeps every expert with weight).
- ``pathway_distance``: Levenshtein distance (unit costs) between token sequences
  "ids of layer 1, SEP, ids of layer 2, ...", SEP a token no expert id equals.
  ``pathway_distance_chars``: the same over the characters of strings like "3,1,5-2,7-4".
  A group's value is the mean over all unordered pairs of its samples.
- ``pathway_consistency``: per sample, the mean over consecutive MoE layers of
  cos(e_l, e_{l+1}), e_l = sum_k g_l(k) W_l[k], W_l the router weight (E, H) whose rows
  are read as expert embeddings; the group value is the mean over samples.
  ``pathway_consistency_normalized``: each cosine divided by the sample's largest cosine
  before averaging (see :func:`normalize_by_max` for a largest cosine <= 0).
- ``routing_entropy`` and ``expert_load``: controls (see their functions).

Routing is read once per checkpoint into a :class:`RoutingProfile`; the group functions
(``group_*``) then score any subset of samples (e.g. a memorisation group) without
running the model again.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from rapidfuzz import process
from rapidfuzz.distance import Levenshtein
from torch import nn

from analysis.metrics.common import (
    Batch,
    MetricResult,
    check_batches,
    config_params,
    to_device,
    working_model,
)

# --- config --------------------------------------------------------------------------------


@dataclass(frozen=True)
class PathwayDistanceConfig:
    """Pathway distances: the cumulative-weight threshold and a bound on distance evaluations."""

    threshold: float = 0.7  # keep top experts until their summed weight reaches this
    # Distinct pairs scored exactly up to this many (5M: about 3,160 distinct pathways, 0.5 s here), a
    # uniform sample of this many above it; 0 means all pairs.
    max_pairs: int = 5_000_000

    def __post_init__(self) -> None:
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, int | float):
            raise ValueError(f"pathway: threshold must be a number in (0, 1], got {self.threshold!r}")
        if not 0 < self.threshold <= 1:
            raise ValueError(f"pathway: threshold must be in (0, 1], got {self.threshold!r}")
        if isinstance(self.max_pairs, bool) or not isinstance(self.max_pairs, int) or self.max_pairs < 0:
            raise ValueError(f"pathway: max_pairs must be an integer >= 0 (0 = all pairs), got {self.max_pairs!r}")


@dataclass(frozen=True)
class RoutingConfig:
    """Routing metrics without parameters (consistency, entropy, load)."""


# --- reading the router --------------------------------------------------------------------


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


def _routing_forward(model: nn.Module, batch: Batch) -> tuple[list[torch.Tensor], torch.Tensor]:
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
    b, t = ids.shape
    weights = []
    for layer_logits in logits:
        if layer_logits.shape[0] != b * t:
            raise ValueError(
                f"router logits of {_model_type(model)} have {layer_logits.shape[0]} rows for a {b}x{t} batch; "
                "expected one row per position (padding included)"
            )
        probs = torch.softmax(layer_logits.float(), dim=-1).view(b, t, -1)  # (B, T, E)
        weights.append(probs * mask[..., None].to(probs.dtype))
    return weights, getattr(out, "logits", None)


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
    weights, entropies, counts, topk, nlls = [], [], [], [], []
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
            probs = torch.stack(layers, dim=1).double()  # (B, L, T, E)
            n_experts = probs.shape[-1]
            real = mask.bool()[:, None, :, None]  # (B, 1, T, 1)
            n = mask.sum(dim=1).double()  # (B,)
            if bool((n == 0).any()):
                row = int((n == 0).nonzero()[0, 0])
                raise ValueError(
                    f"sample {sum(len(c) for c in counts) + row} has no real token (attention_mask all 0); "
                    "drop empty samples from the probe set"
                )
            weights.append(probs.sum(dim=2) / n[:, None, None])  # (B, L, E)
            plogp = torch.where(probs > 0, probs * probs.log(), torch.zeros_like(probs))
            ent = -plogp.sum(dim=-1) / math.log(n_experts) if n_experts > 1 else plogp.sum(dim=-1) * 0
            entropies.append(ent.sum(dim=2))  # (B, L); padding rows are all-zero, entropy 0
            chosen = torch.zeros_like(probs).scatter_(-1, probs.topk(min(top_k, n_experts), dim=-1).indices, 1.0)
            topk.append((chosen * real).sum(dim=2))  # (B, L, E)
            counts.append(n)
        n_layers = len(layers)
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


def _pad_rows(parts: list[torch.Tensor]) -> np.ndarray:
    """Stack (B_i, T_i) float tensors into (sum B_i, max T_i), NaN-padded on the right."""
    width = max(p.shape[1] for p in parts)
    out = np.full((sum(p.shape[0] for p in parts), width), np.nan)
    row = 0
    for part in parts:
        out[row : row + part.shape[0], : part.shape[1]] = part.numpy()
        row += part.shape[0]
    return out


# --- pathways ----------------------------------------------------------------------------------

Pathway = tuple[tuple[int, ...], ...]  # per MoE layer, the kept expert ids in rank order


def pathways_from_weights(weights: np.ndarray, threshold: float = 0.7) -> list[Pathway]:
    """Each sample's pathway from its token-averaged weights (N, L, E)."""
    weights = np.asarray(weights, dtype=np.float64)
    order = np.argsort(-weights, axis=-1, kind="stable")  # (N, L, E): ties keep the lower id first
    ranked = np.take_along_axis(weights, order, axis=-1)
    reached = np.cumsum(ranked, axis=-1) >= threshold - 1e-9  # (N, L, E)
    # Smallest prefix reaching the threshold; all experts when rounding keeps it just short.
    lengths = np.where(reached.any(axis=-1), reached.argmax(axis=-1) + 1, weights.shape[-1])  # (N, L)
    return [
        tuple(tuple(int(e) for e in order[i, layer, : lengths[i, layer]]) for layer in range(weights.shape[1]))
        for i in range(weights.shape[0])
    ]


def pathway_tokens(pathway: Pathway, separator: int) -> tuple[int, ...]:
    """Layer 1's ids, ``separator``, layer 2's ids, ...: the token form of a pathway."""
    out: list[int] = []
    for i, layer in enumerate(pathway):
        if i:
            out.append(separator)
        out.extend(layer)
    return tuple(out)


def pathway_string(pathway: Pathway) -> str:
    """The character form, e.g. "3,1,5-2,7-4": ids joined by ',' within and '-' between layers."""
    return "-".join(",".join(str(e) for e in layer) for layer in pathway)


def _pad(seqs: Sequence[Sequence[int]], fill: int) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.array([len(s) for s in seqs], dtype=np.int64)
    out = np.full((len(seqs), max(int(lengths.max(initial=0)), 1)), fill, dtype=np.int32)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
    return out, lengths


def levenshtein_batch(
    a: np.ndarray, a_len: np.ndarray, b: np.ndarray, b_len: np.ndarray, chunk: int = 2048
) -> np.ndarray:
    """Levenshtein distances (unit costs) of many pairs at once: (P,) int64.

    ``a`` (P, La) and ``b`` (P, Lb) hold the padded sequences, ``a_len``/``b_len`` (P,)
    their lengths. The dynamic programme runs one row of the table per step for all
    pairs of a chunk together; within a row, the insertion chain
    D[i, j] = min(t[j], D[i, j-1] + 1) is a running minimum, D[i, j] - j =
    min_{k <= j} (t[k] - k), so there is no loop over j. Each pair's answer is read at
    row a_len, column b_len; padding beyond a sequence's end never feeds back into the
    cells before it. Pairs are sorted by length so a chunk stops at its own longest
    sequences; chunks of ~2k pairs keep the working rows in cache.
    """
    a, b = np.asarray(a), np.asarray(b)
    index = np.arange(len(a))
    return levenshtein_pairs(a, a_len, index, b, b_len, index, chunk=chunk)


def levenshtein_pairs(
    a: np.ndarray,
    a_len: np.ndarray,
    a_index: np.ndarray,
    b: np.ndarray,
    b_len: np.ndarray,
    b_index: np.ndarray,
    chunk: int = 2048,
) -> np.ndarray:
    """Distances between a[a_index[p]] and b[b_index[p]] for every p: (P,) int64.

    Like :func:`levenshtein_batch`, gathering each chunk's rows on the fly so that
    millions of pairs over a few thousand sequences need no (P, L) copies.
    """
    a_len, b_len = np.asarray(a_len, dtype=np.int64), np.asarray(b_len, dtype=np.int64)
    a_index, b_index = np.asarray(a_index, dtype=np.int64), np.asarray(b_index, dtype=np.int64)
    if int(a_len.max(initial=0)) + int(b_len.max(initial=0)) >= np.iinfo(np.int16).max:
        raise ValueError("levenshtein: sequences longer than 16k are not supported")
    pair_a_len, pair_b_len = a_len[a_index], b_len[b_index]
    out = np.empty(len(a_index), dtype=np.int64)
    order = np.lexsort((pair_b_len, pair_a_len))
    for start in range(0, len(order), chunk):
        sl = order[start : start + chunk]
        width = max(int(pair_b_len[sl].max()), 1)
        out[sl] = _levenshtein_rows(a[a_index[sl]], pair_a_len[sl], b[b_index[sl], :width], pair_b_len[sl])
    return out


def _levenshtein_rows(a: np.ndarray, a_len: np.ndarray, b: np.ndarray, b_len: np.ndarray) -> np.ndarray:
    # int16 halves memory traffic; distances are bounded by the summed lengths (checked above).
    n, width = len(a), b.shape[1] + 1
    cols = np.arange(width, dtype=np.int16)  # (Lb+1,)
    row = np.empty((n, width), dtype=np.int16)
    row[:] = cols  # D[0, j] = j
    result = row[np.arange(n), b_len].astype(np.int64)  # pairs with an empty first sequence
    t = np.empty_like(row)
    diag = np.empty((n, width - 1), dtype=np.int16)
    for i in range(1, int(a_len.max(initial=0)) + 1):
        np.not_equal(a[:, i - 1, None], b, out=diag, casting="unsafe")  # substitution cost 0/1
        diag += row[:, :-1]
        np.add(row[:, 1:], 1, out=t[:, 1:])  # deletion
        np.minimum(t[:, 1:], diag, out=t[:, 1:])
        t[:, 0] = i
        t -= cols
        np.minimum.accumulate(t, axis=1, out=row)  # insertions
        row += cols
        done = a_len == i
        if done.any():
            result[done] = row[done, b_len[done]]
    return result


def levenshtein(x: Sequence, y: Sequence) -> int:
    """Levenshtein distance of two short sequences (or strings), unit costs."""
    a, a_len = _pad([_codes(x)], -1)
    b, b_len = _pad([_codes(y)], -2)
    return int(levenshtein_batch(a, a_len, b, b_len)[0])


def _codes(seq: Sequence) -> list[int]:
    return [ord(c) for c in seq] if isinstance(seq, str) else [int(v) for v in seq]


@dataclass(frozen=True)
class PairwiseMean:
    """The mean distance over unordered pairs of a group, with how it was obtained."""

    mean: float
    stderr: float | None
    per_sample: np.ndarray  # (N,) each sample's mean distance to the others (nan if in no pair)
    n_pairs: int  # pairs scored (all N(N-1)/2 when exact)
    exact: bool
    n_distinct: int


def mean_pairwise_distance(seqs: Sequence[Sequence[int]], *, max_pairs: int = 5_000_000, seed: int = 0) -> PairwiseMean:
    """Mean Levenshtein distance over all unordered pairs of ``seqs``.

    Identical sequences are scored once: with U distinct sequences, when all
    N(N-1)/2 pairs, or the U(U-1)/2 distinct pairs, number at most ``max_pairs`` (or
    ``max_pairs`` is 0), the mean over all pairs is exact. Otherwise ``max_pairs`` pairs
    are drawn uniformly with replacement (seeded).

    Standard error: the mean is a U-statistic of the samples, with variance about
    4 zeta_1 / N, zeta_1 the variance over samples of each one's mean distance to the
    others; a subsample adds var(d) / n_pairs. None for fewer than 3 samples.
    """
    n = len(seqs)
    if n < 2:
        raise ValueError(f"pathway distance needs at least 2 samples in a group, got {n}")
    keys = [tuple(s) for s in seqs]
    distinct: dict[tuple[int, ...], int] = {}
    index = np.array([distinct.setdefault(k, len(distinct)) for k in keys])  # (N,) sample -> distinct id
    uniq = list(distinct)
    u = len(uniq)
    total_pairs = n * (n - 1) // 2
    if max_pairs == 0 or min(total_pairs, u * (u - 1) // 2) <= max_pairs:
        # Every distinct pair at once, in C (rapidfuzz); levenshtein_batch is the reference the tests hold it to.
        dist = process.cdist(uniq, uniq, scorer=Levenshtein.distance, dtype=np.int32).astype(np.float64)
        counts = np.bincount(index, minlength=u).astype(np.float64)
        per_distinct = dist @ counts  # sum of distances from one sample of each kind to all samples
        per_sample = per_distinct[index] / (n - 1)
        mean = float(per_distinct @ counts / 2 / total_pairs)
        var_pairs, n_pairs, exact = 0.0, total_pairs, True
    else:
        rng = np.random.default_rng(seed)
        first = rng.integers(0, n, size=max_pairs)
        second = rng.integers(0, n - 1, size=max_pairs)
        second = second + (second >= first)  # uniform over the other samples
        ua, ub = index[first], index[second]
        d = process.cpdist([uniq[k] for k in ua], [uniq[k] for k in ub], scorer=Levenshtein.distance).astype(np.float64)
        mean = float(d.mean())
        sums = np.bincount(first, weights=d, minlength=n) + np.bincount(second, weights=d, minlength=n)
        hits = np.bincount(first, minlength=n) + np.bincount(second, minlength=n)
        with np.errstate(invalid="ignore", divide="ignore"):
            per_sample = np.where(hits > 0, sums / hits, np.nan)
        var_pairs = float(d.var(ddof=1)) / max_pairs if max_pairs > 1 else 0.0
        n_pairs, exact = max_pairs, False
    seen = per_sample[~np.isnan(per_sample)]
    stderr = math.sqrt(4 * float(seen.var(ddof=1)) / len(seen) + var_pairs) if len(seen) >= 3 else None
    return PairwiseMean(mean, stderr, per_sample, n_pairs, exact, u)


# --- group metrics on a profile ---------------------------------------------------------------------


def _indices(profile: RoutingProfile, indices: Sequence[int] | np.ndarray | None) -> np.ndarray:
    if indices is None:
        return np.arange(profile.n_samples)
    idx = np.asarray(indices, dtype=np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= profile.n_samples):
        raise ValueError(f"sample indices must lie in 0..{profile.n_samples - 1}")
    return idx


def group_pathway_distance(
    profile: RoutingProfile,
    indices: Sequence[int] | np.ndarray | None = None,
    config: PathwayDistanceConfig | None = None,
    *,
    seed: int = 0,
    chars: bool = False,
) -> MetricResult:
    """Mean pathway distance over the pairs of a group of samples (all samples by default).

    ``per_probe`` holds each sample's mean distance to the others in the group;
    ``extra`` the pathways in character form, the number of pairs scored and whether
    the mean is exact.
    """
    config = config or PathwayDistanceConfig()
    idx = _indices(profile, indices)
    paths = pathways_from_weights(profile.weights[idx], config.threshold)
    if chars:
        seqs = [_codes(pathway_string(p)) for p in paths]
    else:
        seqs = [pathway_tokens(p, separator=profile.weights.shape[-1]) for p in paths]
    pm = mean_pairwise_distance(seqs, max_pairs=config.max_pairs, seed=seed)
    return MetricResult(
        name="pathway_distance_chars" if chars else "pathway_distance",
        value=pm.mean,
        stderr=pm.stderr,
        n=len(idx),
        per_probe=tuple(float(x) for x in pm.per_sample),
        params=config_params(config, seed),
        extra={
            "n_pairs": pm.n_pairs,
            "exact": pm.exact,
            "n_distinct_pathways": pm.n_distinct,
            "pathways": tuple(pathway_string(p) for p in paths),
        },
    )


def consistency_cosines(weights: np.ndarray, routers: Sequence[np.ndarray]) -> np.ndarray:
    """cos(e_l, e_{l+1}) per sample and consecutive layer pair: (N, L-1).

    e_l = g_l @ W_l, g (N, L, E) averaged router weights and W_l (E, H) layer l's router
    weight. A zero e_l (possible only with zero router rows) gives cosine 0.
    """
    weights = np.asarray(weights, dtype=np.float64)
    if weights.shape[1] != len(routers):
        raise ValueError(f"{weights.shape[1]} MoE layers of weights but {len(routers)} router matrices")
    if len(routers) < 2:
        raise ValueError("pathway consistency needs at least two MoE layers (it compares consecutive layers)")
    if len({w.shape[1] for w in routers}) != 1:
        raise ValueError("router weights of consecutive layers have different hidden sizes; cosine is undefined")
    emb = np.stack([weights[:, k] @ np.asarray(w, np.float64) for k, w in enumerate(routers)], axis=1)  # (N, L, H)
    norms = np.linalg.norm(emb, axis=-1)  # (N, L)
    dots = (emb[:, :-1] * emb[:, 1:]).sum(axis=-1)  # (N, L-1)
    denom = norms[:, :-1] * norms[:, 1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, dots / denom, 0.0)


def normalize_by_max(cosines: np.ndarray) -> np.ndarray:
    """Each sample's cosines divided by its largest cosine: (N, L-1) -> (N, L-1).

    With a positive largest cosine m the values are c / m (<= 1, the largest is 1). When
    no cosine is positive, dividing by m <= 0 would flip signs or divide by zero, so the
    sample's largest |cosine| is used instead (values keep their signs, in [-1, 1]); a
    sample whose cosines are all zero stays zero.
    """
    cosines = np.asarray(cosines, dtype=np.float64)
    top = cosines.max(axis=1, keepdims=True)  # (N, 1)
    scale = np.where(top > 0, top, np.abs(cosines).max(axis=1, keepdims=True))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(scale > 0, cosines / scale, 0.0)


def group_pathway_consistency(
    profile: RoutingProfile,
    indices: Sequence[int] | np.ndarray | None = None,
    *,
    normalized: bool = False,
    seed: int = 0,
) -> MetricResult:
    """Mean over samples of the mean consecutive-layer cosine (raw or max-normalised).

    ``per_probe`` holds the per-sample values; ``extra["per_layer_pair"]`` the mean
    cosine of each consecutive layer pair (raw or normalised alike).
    """
    if profile.routers is None:
        raise ValueError(
            f"pathway consistency needs the router weight matrices, which were not found in {profile.model_type}"
        )
    idx = _indices(profile, indices)
    if len(idx) == 0:
        raise ValueError("pathway consistency: the group has no samples")
    cos = consistency_cosines(profile.weights[idx], profile.routers)  # (N, L-1)
    if normalized:
        cos = normalize_by_max(cos)
    per_sample = cos.mean(axis=1)
    mean = float(per_sample.mean())
    stderr = float(per_sample.std(ddof=1) / math.sqrt(len(per_sample))) if len(per_sample) > 1 else None
    return MetricResult(
        name="pathway_consistency_normalized" if normalized else "pathway_consistency",
        value=mean,
        stderr=stderr,
        n=len(idx),
        per_probe=tuple(float(x) for x in per_sample),
        params=config_params(RoutingConfig(), seed),
        extra={"per_layer_pair": tuple(float(x) for x in cos.mean(axis=0))},
    )


def group_routing_entropy(
    profile: RoutingProfile, indices: Sequence[int] | np.ndarray | None = None, *, seed: int = 0
) -> MetricResult:
    """Mean over real tokens and MoE layers of the router's entropy divided by ln E.

    0 = every token sent to one expert with certainty, 1 = uniform over all E experts.
    Tokens weigh equally (a long sample counts more). The standard error treats samples
    as clusters of tokens: sqrt(N/(N-1) sum_s (S_s - m n_s)^2) / sum_s n_s, S_s the
    sample's entropy sum over its tokens and layers and n_s its token-layer count.
    ``per_probe`` holds per-sample means; ``extra["per_layer"]`` the per-layer means.
    """
    idx = _indices(profile, indices)
    sums = profile.entropy_sums[idx]  # (N, L)
    n_tok = profile.n_tokens[idx].astype(np.float64)  # (N,)
    n_layers = sums.shape[1]
    per_sample_sum, per_sample_n = sums.sum(axis=1), n_tok * n_layers
    mean = float(per_sample_sum.sum() / per_sample_n.sum())
    k = len(idx)
    stderr = (
        math.sqrt(k / (k - 1) * float(((per_sample_sum - mean * per_sample_n) ** 2).sum())) / float(per_sample_n.sum())
        if k > 1
        else None
    )
    return MetricResult(
        name="routing_entropy",
        value=mean,
        stderr=stderr,
        n=k,
        per_probe=tuple(float(x) for x in per_sample_sum / per_sample_n),
        params=config_params(RoutingConfig(), seed),
        extra={"per_layer": tuple(float(x) for x in sums.sum(axis=0) / n_tok.sum())},
    )


def group_expert_load(
    profile: RoutingProfile, indices: Sequence[int] | np.ndarray | None = None, *, seed: int = 0
) -> MetricResult:
    """Load balance: normalised entropy of the experts' shares of top-k assignments.

    Per layer, f(k) = (tokens whose top-k includes expert k) / (k_top * tokens), a
    distribution over experts; balance = H(f) / ln E (1 = perfectly even load, 0 = one
    expert takes everything). The value is the mean over layers. ``extra`` has the
    fractions per layer and their coefficient of variation std(f) / mean(f).
    """
    idx = _indices(profile, indices)
    counts = profile.topk_counts[idx].sum(axis=0)  # (L, E)
    n_experts = counts.shape[1]
    frac = counts / counts.sum(axis=1, keepdims=True)  # (L, E)
    with np.errstate(invalid="ignore", divide="ignore"):
        ent = -np.where(frac > 0, frac * np.log(frac), 0.0).sum(axis=1)  # (L,)
    balance = ent / math.log(n_experts) if n_experts > 1 else np.ones_like(ent)
    cv = frac.std(axis=1) / frac.mean(axis=1)
    return MetricResult(
        name="expert_load",
        value=float(balance.mean()),
        stderr=None,
        n=int(profile.n_tokens[idx].sum()),
        per_probe=tuple(float(x) for x in balance),
        params=config_params(RoutingConfig(), seed),
        extra={
            "fractions": tuple(tuple(float(x) for x in row) for row in frac),
            "cv": tuple(float(x) for x in cv),
            "top_k": profile.top_k,
        },
    )


# --- metric entry points: (model, batches, config) -> MetricResult ---------------------------------


def pathway_distance(
    model: nn.Module,
    batches: Sequence[Batch],
    config: PathwayDistanceConfig | None = None,
    *,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> MetricResult:
    """Mean pairwise pathway distance (token form) over all samples of ``batches``."""
    return group_pathway_distance(routing_profile(model, batches, device=device), None, config, seed=seed)


def pathway_distance_chars(
    model: nn.Module,
    batches: Sequence[Batch],
    config: PathwayDistanceConfig | None = None,
    *,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> MetricResult:
    """Mean pairwise pathway distance (character form) over all samples of ``batches``."""
    return group_pathway_distance(routing_profile(model, batches, device=device), None, config, seed=seed, chars=True)


def pathway_consistency(
    model: nn.Module,
    batches: Sequence[Batch],
    config: RoutingConfig | None = None,
    *,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> MetricResult:
    """Mean raw pathway consistency over all samples of ``batches``."""
    return group_pathway_consistency(routing_profile(model, batches, device=device), seed=seed)


def pathway_consistency_normalized(
    model: nn.Module,
    batches: Sequence[Batch],
    config: RoutingConfig | None = None,
    *,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> MetricResult:
    """Mean max-normalised pathway consistency over all samples of ``batches``."""
    return group_pathway_consistency(routing_profile(model, batches, device=device), normalized=True, seed=seed)


def routing_entropy(
    model: nn.Module,
    batches: Sequence[Batch],
    config: RoutingConfig | None = None,
    *,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> MetricResult:
    """Normalised router entropy over all real tokens and MoE layers of ``batches``."""
    return group_routing_entropy(routing_profile(model, batches, device=device), seed=seed)


def expert_load(
    model: nn.Module,
    batches: Sequence[Batch],
    config: RoutingConfig | None = None,
    *,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> MetricResult:
    """Expert load balance over all real tokens of ``batches``."""
    return group_expert_load(routing_profile(model, batches, device=device), seed=seed)


# Each routing metric as a function of a RoutingProfile: a job reads the routing once per
# checkpoint and scores every routing metric from it (and each memorisation group too).
FROM_PROFILE = {
    "pathway_distance": lambda profile, config, seed: group_pathway_distance(profile, None, config, seed=seed),
    "pathway_distance_chars": lambda profile, config, seed: group_pathway_distance(
        profile, None, config, seed=seed, chars=True
    ),
    "pathway_consistency": lambda profile, config, seed: group_pathway_consistency(profile, seed=seed),
    "pathway_consistency_normalized": lambda profile, config, seed: group_pathway_consistency(
        profile, normalized=True, seed=seed
    ),
    "routing_entropy": lambda profile, config, seed: group_routing_entropy(profile, seed=seed),
    "expert_load": lambda profile, config, seed: group_expert_load(profile, seed=seed),
}


# --- memorisation ---------------------------------------------------------------------------------------


def memorised_from(
    losses: np.ndarray | Sequence[Sequence[float]],
    steps: np.ndarray | Sequence[int],
    eps: float,
    delta: float = 0.05,
) -> np.ndarray:
    """The step from which each training sample counts as memorised, or -1.

    ``losses`` is (n_checkpoints, n_samples), rows in the order of ``steps`` (strictly
    increasing). A sample is memorised from t* when at t* and every later checkpoint its
    loss is <= eps and within delta of its loss at the last checkpoint; t* is the
    earliest such checkpoint. A NaN loss breaks the run. Returns (n_samples,) int64.
    """
    losses = np.asarray(losses, dtype=np.float64)
    steps = np.asarray(steps, dtype=np.int64)
    if losses.ndim != 2 or steps.ndim != 1 or losses.shape[0] != steps.shape[0] or len(steps) == 0:
        raise ValueError(
            f"memorised_from: losses must be (n_checkpoints, n_samples) with one row per step; "
            f"got losses {losses.shape} and {steps.shape[0] if steps.ndim == 1 else steps.shape} steps"
        )
    if np.any(np.diff(steps) <= 0):
        raise ValueError("memorised_from: steps must be strictly increasing; sort checkpoints by step first")
    if not math.isfinite(eps) or not math.isfinite(delta) or delta < 0:
        raise ValueError(f"memorised_from: eps must be finite and delta a number >= 0, got eps={eps}, delta={delta}")
    ok = (losses <= eps) & (np.abs(losses - losses[-1]) <= delta)  # (C, S)
    from_here = np.flip(np.logical_and.accumulate(np.flip(ok, axis=0), axis=0), axis=0)  # ok at every later one
    first = from_here.argmax(axis=0)  # (S,) earliest checkpoint of the final run
    return np.where(from_here[-1], steps[first], -1).astype(np.int64)


def group_by_memorisation(
    first_steps: np.ndarray | Sequence[int], bins: Sequence[int] | None = None
) -> dict[int, np.ndarray]:
    """Sample indices grouped by memorisation step (-1: never memorised), keys ascending.

    With ``bins`` (increasing step edges), memorised samples are grouped by the bin
    [edge_i, edge_{i+1}) their step falls in, keyed by edge_i; steps before the first
    edge join the first bin, the last bin is open-ended.
    """
    first_steps = np.asarray(first_steps, dtype=np.int64)
    keys = first_steps.copy()
    if bins is not None:
        edges = np.asarray(bins, dtype=np.int64)
        if edges.ndim != 1 or len(edges) == 0 or np.any(np.diff(edges) <= 0):
            raise ValueError("group_by_memorisation: bins must be a non-empty, strictly increasing list of steps")
        memorised = first_steps >= 0
        slot = np.clip(np.searchsorted(edges, first_steps, side="right") - 1, 0, len(edges) - 1)
        keys = np.where(memorised, edges[slot], -1)
    return {int(k): np.flatnonzero(keys == k) for k in np.unique(keys)}
