"""A sample's expert pathway: the top experts of each MoE layer, cut at a cumulative-weight threshold.

Also the two written forms the distances compare: tokens (expert ids with a separator token
between layers) and characters ("3,1,5-2,7-4").
"""

from __future__ import annotations

import numpy as np

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
