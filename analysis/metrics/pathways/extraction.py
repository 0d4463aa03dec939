"""A sample's expert pathway: the top experts of each MoE layer, cut at a cumulative-weight threshold.

Also the two written forms the distances compare: tokens (expert ids with a separator token
between layers) and characters ("3,1,5-2,7-4"). :func:`pathway_table` and :func:`pathway_texts`
give both forms for many samples at once, in NumPy, without a Python loop over samples.
"""

from __future__ import annotations

import math

import numpy as np

Pathway = tuple[tuple[int, ...], ...]  # per MoE layer, the kept expert ids in rank order

# Code points of the token form: expert e -> chr(e + 1), the layer separator -> chr(E + 1). Code point 0
# is never used because NumPy's fixed-width strings end at the first trailing NUL.
_SURROGATES = 0xD800  # code points from here to 0xDFFF are not characters: shifted past them


def pathway_table(weights: np.ndarray, threshold: float = 0.7) -> np.ndarray:
    """Every sample's pathway as one int64 row: (N, L, E) kept expert ids in rank order, -1 after the cut.

    Per layer, experts ranked by weight (descending; ties keep the lower id first), cut at
    the smallest prefix whose summed weight is >= ``threshold`` (a 1e-9 slack absorbs float
    rounding; all experts when rounding keeps the sum just short). Two samples have the
    same pathway exactly when their rows are equal, so the rows also serve to deduplicate.
    """
    weights = np.asarray(weights, dtype=np.float64)
    if weights.ndim != 3:
        raise ValueError(f"pathway weights must be (samples, layers, experts), got shape {weights.shape}")
    order = np.argsort(-weights, axis=-1, kind="stable")  # (N, L, E)
    ranked = np.take_along_axis(weights, order, axis=-1)
    reached = np.cumsum(ranked, axis=-1) >= threshold - 1e-9  # (N, L, E)
    lengths = np.where(reached.any(axis=-1), reached.argmax(axis=-1) + 1, weights.shape[-1])  # (N, L)
    kept = np.arange(weights.shape[-1]) < lengths[..., None]  # (N, L, E)
    return np.where(kept, order, -1).astype(np.int64)


def pathways_from_weights(weights: np.ndarray, threshold: float = 0.7) -> list[Pathway]:
    """Each sample's pathway from its token-averaged weights (N, L, E)."""
    table = pathway_table(weights, threshold)
    return [tuple(tuple(e for e in layer if e >= 0) for layer in sample) for sample in table.tolist()]


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


def pathway_texts(table: np.ndarray, *, chars: bool) -> list[str]:
    """Each row of a :func:`pathway_table` as a string: the character form, or the token form as characters.

    ``chars=True`` gives :func:`pathway_string` of each pathway. Otherwise each token of
    :func:`pathway_tokens` (separator E) becomes one character, expert e -> chr(e + 1) and
    the separator chr(E + 1) (shifted past the surrogate block in the unlikely case of
    55,000+ experts): a one-to-one recoding, so Levenshtein distances between these strings
    equal those between the token sequences, and rapidfuzz compares strings faster than
    lists of ints.
    """
    table = np.asarray(table, dtype=np.int64)
    if table.ndim != 3:
        raise ValueError(f"pathway table must be (samples, layers, experts) as pathway_table gives, got {table.shape}")
    n, n_layers, n_experts = table.shape
    kept = table >= 0  # (N, L, E)
    # Each kept id is followed by ',' inside its layer and '-' after its layer's last id, except in the last layer.
    last = kept & ~np.concatenate([kept[..., 1:], np.zeros_like(kept[..., :1])], axis=-1)  # (N, L, E)
    between = last & (np.arange(n_layers) < n_layers - 1)[:, None]
    if chars:
        width = len(str(max(n_experts - 1, 0)))  # digits of the largest id
        ids = np.maximum(table, 0)[..., None]  # (N, L, E, 1)
        power = 10 ** np.arange(width - 1, -1, -1)  # (D,) most significant digit first
        digits = (ids // power) % 10 + ord("0")  # (N, L, E, D)
        # Leading zeros are dropped (code 0) except the units digit, so id 7 reads "7", not "07".
        digits = np.where((ids >= power) | (power == 1), digits, 0)
        sep = np.where(between, ord("-"), np.where(kept & ~last, ord(","), 0))[..., None]  # (N, L, E, 1)
        codes = np.where(kept[..., None], np.concatenate([digits, sep], axis=-1), 0)  # (N, L, E, D + 1)
    else:
        letters = np.where(kept, table + 1, 0)  # (N, L, E)
        sep = np.where(between.any(axis=-1), n_experts + 1, 0)[..., None]  # (N, L, 1)
        codes = np.concatenate([letters, sep], axis=-1)  # (N, L, E + 1)
        codes = np.where(codes >= _SURROGATES, codes + 0x800, codes)
        if int(codes.max(initial=0)) > 0x10FFFF:
            raise ValueError(f"pathway: {n_experts} experts are too many to write one character per expert id")
    return _packed_strings(codes.reshape(n, math.prod(codes.shape[1:])))


def _packed_strings(codes: np.ndarray) -> list[str]:
    """Rows of code points (N, W), zeros meaning "no character", as N strings with the zeros removed."""
    n = codes.shape[0]
    present = codes > 0
    lengths = present.sum(axis=1)
    width = max(int(lengths.max(initial=0)), 1)
    packed = np.zeros((n, width), dtype=np.uint32)
    rows, _ = np.nonzero(present)
    packed[rows, (np.cumsum(present, axis=1) - 1)[present]] = codes[present]
    # A (N, W) UCS-4 array read as N fixed-width strings; NumPy drops the trailing NULs of shorter ones.
    return packed.view(f"<U{width}").ravel().tolist()
