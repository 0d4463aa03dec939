"""Monotone least-squares fits: pool-adjacent-violators and the isotonic fit the predictor ranking uses.

:func:`pava` is the readable reference; :func:`isotonic_fit` averages tied x values and runs scipy's
implementation, which the tests compare with the reference.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.optimize import isotonic_regression


def pava(y: Sequence[float] | np.ndarray, weights: Sequence[float] | np.ndarray | None = None) -> np.ndarray:
    """Pool-adjacent-violators: the non-decreasing sequence closest to ``y`` in weighted least squares.

    ``[1, 3, 2, 4] -> [1, 2.5, 2.5, 4]``: each violating neighbour pair is replaced by its weighted mean,
    repeatedly, until the sequence no longer decreases anywhere.
    """
    y = np.asarray(y, dtype=float)
    w = np.ones_like(y) if weights is None else np.asarray(weights, dtype=float)
    means: list[float] = []
    sizes: list[float] = []
    counts: list[int] = []
    for value, weight in zip(y, w, strict=True):
        means.append(float(value))
        sizes.append(float(weight))
        counts.append(1)
        while len(means) > 1 and means[-2] > means[-1]:
            total = sizes[-2] + sizes[-1]
            merged = (means[-2] * sizes[-2] + means[-1] * sizes[-1]) / total
            count = counts[-2] + counts[-1]
            del means[-1], sizes[-1], counts[-1]
            means[-1], sizes[-1], counts[-1] = merged, total, count
    return np.repeat(means, counts)


def isotonic_fit(
    x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray, *, increasing: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Monotone least-squares fit of y on x: returns the distinct x values (sorted) and the fit at each.

    Points with equal x are first averaged (weighted by their count), then the pool-adjacent-violators fit
    runs on the sorted means (scipy's, in C; :func:`pava` is the readable reference the tests compare it
    with); ``increasing=False`` fits a non-increasing function. Predict elsewhere with ``np.interp``.
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"isotonic_fit needs two equal, non-empty series (got {len(x)} and {len(y)})")
    ux, inverse = np.unique(x, return_inverse=True)
    counts = np.bincount(inverse).astype(float)
    means = np.bincount(inverse, weights=y) / counts
    return ux, isotonic_regression(means, weights=counts, increasing=increasing).x
