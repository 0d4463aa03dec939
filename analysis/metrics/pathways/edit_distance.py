"""Levenshtein distance (unit costs) over integer sequences: the project's own NumPy kernel.

The metrics compute their distances with rapidfuzz (:mod:`.distance`); this vectorised
dynamic programme is the reference the tests hold rapidfuzz to, and the baseline of
``python -m bench.pathways``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def pad_sequences(seqs: Sequence[Sequence[int]], fill: int) -> tuple[np.ndarray, np.ndarray]:
    """Sequences as one (N, max length) int32 table right-padded with ``fill`` (at least one column),
    and their lengths (N,) int64: the input of :func:`levenshtein_batch` and :func:`levenshtein_pairs`."""
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
    a, a_len = pad_sequences([sequence_codes(x)], -1)
    b, b_len = pad_sequences([sequence_codes(y)], -2)
    return int(levenshtein_batch(a, a_len, b, b_len)[0])


def sequence_codes(seq: Sequence) -> list[int]:
    """A string as its characters' code points, any other sequence as ints: what the kernels compare."""
    return [ord(c) for c in seq] if isinstance(seq, str) else [int(v) for v in seq]
