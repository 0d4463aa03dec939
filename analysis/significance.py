"""Error-rate control behind every "significant" the dashboard prints.

Three procedures, each checked by null and planted-signal simulations (tests/test_significance.py,
``python -m bench.calibration``):

- :func:`span_test`, for divergence windows. Every candidate span (i, j) of a run is a hypothesis "the score
  did not change between checkpoints i and j". Its statistic is the change over the combined stderr of the
  two endpoints. The null distribution of the *largest* statistic over all candidate spans is simulated from
  the measured stderrs (single-step max-T, Westfall & Young 1993), so the chance that a run gets any false
  window is alpha whatever the number of checkpoints or spans tried. A score without stderrs is studentized:
  its noise is estimated from the series, and every simulated series re-estimates its own, so the estimate's
  uncertainty is in the null.
- :func:`change_correlation`, for loss-vs-score correlations. Two trending series correlate whether or not
  they are related; their *changes* between checkpoints do not. Spearman's rho of the first differences,
  with a Fisher-z interval whose n is shrunk for the autocorrelation the differences still have (Bartlett's
  effective sample size).
- :func:`beats_baseline`, for the predictor ranking. Paired out-of-sample squared errors of each candidate
  against the baseline's; a sign-flip test over blocks of consecutive checkpoints (neighbouring errors are
  alike) with the max over candidates, so "beats the loss" is adjusted for how many candidates were tried.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

# -- the stderr of a share of items right (acc, exact_match) -------------------------------------------------

# lm-eval scores that are the mean of a 0/1 outcome over the task's items.
_BINARY_MEANS = frozenset({"acc", "acc_norm", "exact_match"})


def is_binary_mean(metric: str) -> bool:
    """Whether a stored metric (``task/acc,none``) is a share of items right. The fine-tune probe's
    ``finetune/...`` scores are changes between two shares, not a share, so they are not."""
    if metric.startswith("finetune/"):
        return False
    return metric.rsplit("/", 1)[-1].split(",", 1)[0] in _BINARY_MEANS


def binary_mean_stderr(share: np.ndarray, n: np.ndarray, stderr: np.ndarray) -> np.ndarray:
    """The stderr of a share of ``n`` items right, kept away from zero at 0 and 1.

    lm-eval reports sqrt(p (1 - p) / (n - 1)), which is 0 for a task scored all right or all wrong: an
    interval of width zero, and a gap of "1.000 +- 0.000" between two such runs. The plus-four estimate
    (Agresti & Coull 1998: two more items right and two more wrong) is sqrt(p~ (1 - p~) / (n + 4)) with
    p~ = (n p + 2) / (n + 4); it is about lm-eval's away from the ends (0.049 against 0.050 at p = 0.5,
    n = 100) and 0.013 at p = 1, n = 100. The larger of the two is returned, so interior values keep
    lm-eval's stderr; rows without a usable n or with a share outside [0, 1] keep theirs unchanged.
    """
    share, n, stderr = (np.asarray(v, dtype=float) for v in (share, n, stderr))
    ok = np.isfinite(share) & (share >= 0) & (share <= 1) & np.isfinite(n) & (n >= 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        tilde = (share * n + 2) / (n + 4)
        plus_four = np.sqrt(tilde * (1 - tilde) / (n + 4))
    return np.where(ok, np.fmax(stderr, plus_four), stderr)


# -- noise of a series without stderrs -------------------------------------------------------------------


def scatter_stderr(values: np.ndarray) -> float:
    """Per-point noise of a series from its own checkpoint-to-checkpoint jitter.

    sigma = 1.4826 * MAD(first differences) / sqrt(2): a difference of two independent points has twice a
    point's variance, and the median absolute deviation ignores the few large differences of a real move,
    so a sharp rise does not inflate its own noise estimate. 0 for fewer than three points.
    """
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if len(values) < 3:
        return 0.0
    diffs = np.diff(values)
    mad = float(np.median(np.abs(diffs - np.median(diffs))))
    return 1.4826 * mad / math.sqrt(2)


def _scatter_rows(series: np.ndarray) -> np.ndarray:
    """``scatter_stderr`` of every row of a (replicates, n) array at once."""
    diffs = np.diff(series, axis=1)
    centred = np.abs(diffs - np.median(diffs, axis=1, keepdims=True))
    return 1.4826 * np.median(centred, axis=1) / math.sqrt(2)


# -- windows: max-T over candidate spans ------------------------------------------------------------------


@dataclass(frozen=True)
class SpanTest:
    """Adjusted p-values and simultaneous intervals for every candidate span of one run.

    ``start``/``end`` index the points, ``sign`` is +1 where a rise is tested and -1 where a fall is;
    ``change`` = score[end] - score[start]; ``stat`` = sign * change / stderr of the change; ``p_adjusted``
    is the share of simulated null runs whose largest statistic reached this one (FWER-adjusted);
    ``change_lo``/``change_hi`` = change -/+ ``critical`` * stderr, simultaneous over all spans: each lies on
    its side of the true change with probability >= 1 - alpha for every span at once, so the pair is a
    (1 - 2 alpha) simultaneous interval and ``sign * change_lo > 0`` exactly when ``p_adjusted <= alpha``
    (up to Monte-Carlo resolution). ``stderr_source`` is reported, scatter (estimated from the series) or a
    mix; ``n_sim`` the number of simulated null runs.
    """

    start: np.ndarray
    end: np.ndarray
    sign: np.ndarray
    change: np.ndarray
    stat: np.ndarray
    p_adjusted: np.ndarray
    change_lo: np.ndarray
    change_hi: np.ndarray
    critical: float
    stderr_source: str
    n_sim: int


def _pair_stats(series: np.ndarray, se: np.ndarray, start: np.ndarray, end: np.ndarray, sign: np.ndarray):
    """sign * (s[end] - s[start]) / sqrt(se[start]^2 + se[end]^2) for rows of series/se (R, n)."""
    change = series[:, end] - series[:, start]
    scale = np.sqrt(se[:, start] ** 2 + se[:, end] ** 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        stat = sign * change / scale
    return np.where(np.isnan(stat), 0.0, stat)


def span_test(
    score: np.ndarray,
    stderr: np.ndarray,
    start: np.ndarray,
    end: np.ndarray,
    sign: np.ndarray,
    *,
    alpha: float = 0.05,
    n_sim: int = 2000,
    seed: int = 0,
    cov: np.ndarray | None = None,
    items: int | None = None,
) -> SpanTest | None:
    """Test every candidate span (start[k], end[k]) of one series for a change in direction sign[k].

    ``stderr`` is each point's standard error; NaN where unknown, then estimated from the series by
    :func:`scatter_stderr` and re-estimated in every simulated series. Under the null every point is its
    (constant) mean plus independent Gaussian noise of that stderr. With ``cov`` (n x n, the covariance of
    the point estimates, e.g. from the same items scored at every checkpoint: :func:`paired_covariance`)
    the noise is correlated instead: a span's change has variance c_ii + c_jj - 2 c_ij, smaller when the
    same items were scored at both ends, and the null is simulated from that covariance (``stderr`` is then
    ignored); ``items``, the number of items ``cov`` was estimated from, makes the simulated null a
    multivariate t with items - 1 degrees of freedom, as the observed statistic divides by an estimated
    covariance. Returns None when nothing can be tested (no candidates, or no stderr and fewer than 3
    points / no jitter to estimate one from).
    """
    if cov is not None:
        return _span_test_paired(score, cov, start, end, sign, alpha=alpha, n_sim=n_sim, seed=seed, items=items)
    score = np.asarray(score, dtype=float)
    stderr = np.abs(np.asarray(stderr, dtype=float))
    start, end = np.asarray(start, dtype=int), np.asarray(end, dtype=int)
    sign = np.asarray(sign, dtype=float)
    if len(start) == 0:
        return None
    reported = np.isfinite(stderr)
    estimated = not reported.all()
    sigma = scatter_stderr(score) if estimated else 0.0
    if estimated and sigma <= 0:
        return None
    se = np.where(reported, stderr, sigma)
    observed = _pair_stats(score[None, :], se[None, :], start, end, sign)[0]

    rng = np.random.default_rng(seed)
    n = len(score)
    chunk = max(1, int(4_000_000 // max(len(start), n)))
    maxima = np.empty(n_sim)
    se32 = se.astype(np.float32)
    sign32 = sign.astype(np.float32)
    with np.errstate(divide="ignore"):
        weight = (sign / np.sqrt(se[start] ** 2 + se[end] ** 2)).astype(np.float32)
    weight[~np.isfinite(weight)] = 0.0  # exact points (stderr 0) never move under the null
    for lo in range(0, n_sim, chunk):
        hi = min(n_sim, lo + chunk)
        # float32: the maxima need ~3 digits, and half the memory traffic makes n = 500 twice as fast
        sim = rng.standard_normal((hi - lo, n), dtype=np.float32) * se32[None, :]
        if estimated:
            sim_se = np.where(reported[None, :], se32[None, :], _scatter_rows(sim)[:, None]).astype(np.float32)
            maxima[lo:hi] = _pair_stats(sim, sim_se, start, end, sign32).max(axis=1)
        else:  # fixed stderrs: one weight per span, computed once
            maxima[lo:hi] = ((sim[:, end] - sim[:, start]) * weight[None, :]).max(axis=1)
    change = score[end] - score[start]
    scale = np.sqrt(se[start] ** 2 + se[end] ** 2)
    source = "reported" if not estimated else ("scatter" if not reported.any() else "reported+scatter")
    return _adjusted(start, end, sign, change, observed, scale, maxima, alpha, source)


def _adjusted(start, end, sign, change, observed, scale, maxima: np.ndarray, alpha: float, source: str) -> SpanTest:
    """The SpanTest of observed statistics against the simulated null maxima: p-values and simultaneous bounds."""
    maxima = np.sort(maxima)
    exceed = len(maxima) - np.searchsorted(maxima, observed, side="left")
    critical = float(np.quantile(maxima, 1.0 - alpha))
    return SpanTest(
        start=start,
        end=end,
        sign=sign,
        change=change,
        stat=observed,
        p_adjusted=(1.0 + exceed) / (1.0 + len(maxima)),
        change_lo=change - critical * scale,
        change_hi=change + critical * scale,
        critical=critical,
        stderr_source=source,
        n_sim=len(maxima),
    )


def paired_covariance(items: np.ndarray) -> np.ndarray:
    """Covariance of per-checkpoint means of the same items: ``items`` is (n_items, n_checkpoints).

    Cov(mean_i, mean_j) = sample covariance of the item values at checkpoints i and j, over n_items. An
    item that is easy at one checkpoint tends to be easy at the next, so neighbouring scores share most of
    their sampling noise, and their difference is far better known than two independent stderrs say.
    """
    items = np.asarray(items, dtype=float)
    return np.atleast_2d(np.cov(items, rowvar=False, ddof=1)) / items.shape[0]


def _span_test_paired(
    score: np.ndarray,
    cov: np.ndarray,
    start: np.ndarray,
    end: np.ndarray,
    sign: np.ndarray,
    *,
    alpha: float,
    n_sim: int,
    seed: int,
    items: int | None = None,
) -> SpanTest | None:
    score, cov = np.asarray(score, dtype=float), np.asarray(cov, dtype=float)
    start, end, sign = np.asarray(start, dtype=int), np.asarray(end, dtype=int), np.asarray(sign, dtype=float)
    if len(start) == 0:
        return None
    var = np.diag(cov)[start] + np.diag(cov)[end] - 2 * cov[start, end]
    scale = np.sqrt(np.maximum(var, 0.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        weight = np.where(scale > 0, sign / scale, 0.0)
    change = score[end] - score[start]
    observed = np.where(scale > 0, change * weight, np.where(sign * change > 0, np.inf, 0.0))
    # Draws from N(0, cov) through its symmetric square root (clipped at 0: a sample covariance can be
    # slightly indefinite when there are fewer items than checkpoints).
    values, vectors = np.linalg.eigh(cov)
    root = (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T
    rng = np.random.default_rng(seed)
    n = len(score)
    chunk = max(1, int(4_000_000 // max(len(start), n)))
    maxima = np.empty(n_sim)
    for lo in range(0, n_sim, chunk):
        hi = min(n_sim, lo + chunk)
        sim = rng.standard_normal((hi - lo, n)) @ root
        if items is not None and items > 2:
            # The observed statistic divides by a covariance estimated from ``items`` items, so its tails are
            # heavier than a normal's: each simulated run is divided by sqrt(chi2_df / df), df = items - 1 (a
            # multivariate t), which put 100 items back at the nominal rate (it was 0.07-0.075 at 0.05).
            sim /= np.sqrt(rng.chisquare(items - 1, size=(hi - lo, 1)) / (items - 1))
        maxima[lo:hi] = ((sim[:, end] - sim[:, start]) * weight[None, :]).max(axis=1)
    return _adjusted(start, end, sign, change, observed, scale, maxima, alpha, "paired")


def report_spans(start: np.ndarray, end: np.ndarray, keep: np.ndarray, strength: np.ndarray | None = None) -> list[int]:
    """Indices of the significant spans (``keep``) to report as windows, one per move.

    A significant span is *minimal* when no other significant span lies inside it: it brackets a move
    tightly. Minimal spans that overlap, touch or are one checkpoint apart are joined, left to right, while
    the joined span is itself a significant candidate (so every reported window carries its own test), and a
    long gradual rise comes out as one window instead of many small ones. Each start has at most one minimal
    span (the one with the nearest significant end), so this is linear in the number of points.

    With ``strength`` (each span's test statistic), two reported spans that still share a change (a stretch
    between two checkpoints: their union was not a candidate, e.g. the loss is not flat across it) are one
    move seen twice: only the stronger is kept. Spans that share only an end point are different moves.
    Which significant spans are reported never changes whether a run has a window, so the error rate holds.
    """
    index = {(int(i), int(j)): k for k, (i, j) in enumerate(zip(start, end, strict=True)) if keep[k]}
    if not index:
        return []
    n = int(max(end[keep])) + 1
    nearest_end = np.full(n + 1, np.iinfo(np.int64).max)
    for i, j in index:
        nearest_end[i] = min(nearest_end[i], j)
    # after[i]: the nearest significant end among spans that start after i
    after = np.minimum.accumulate(nearest_end[::-1])[::-1]
    after = np.r_[after[1:], np.iinfo(np.int64).max]
    minimal = [(i, int(nearest_end[i])) for i in range(n) if nearest_end[i] < after[i]]
    reported: list[tuple[int, int]] = []
    for i, j in minimal:
        if reported:
            a, b = reported[-1]
            joined = (a, max(b, j))
            if i <= b + 1 and joined in index:
                reported[-1] = joined
                continue
            if j <= b:  # inside the window already reported, which could not absorb it: nothing new
                continue
        reported.append((i, j))
    chosen = [index[span] for span in reported]
    if strength is None:
        return chosen
    kept: list[int] = []
    for k in sorted(chosen, key=lambda k: -float(strength[k])):  # strongest first
        if all(max(start[k], start[o]) >= min(end[k], end[o]) for o in kept):
            kept.append(k)
    return sorted(kept, key=lambda k: int(start[k]))


# -- correlation of changes --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChangeCorrelation:
    """Spearman's rho of checkpoint-to-checkpoint changes, with its interval and p-value (two-sided)."""

    rho: float
    lo: float
    hi: float
    p_value: float
    n_changes: int
    n_effective: float


def _autocorrelation(x: np.ndarray, max_lag: int) -> np.ndarray:
    x = x - x.mean()
    denom = float(x @ x)
    if denom <= 0:
        return np.zeros(max_lag)
    return np.array([float(x[:-k] @ x[k:]) / denom for k in range(1, max_lag + 1)])


def effective_n(a: np.ndarray, b: np.ndarray) -> float:
    """Bartlett's effective sample size for the correlation of two autocorrelated series.

    n / (1 + 2 * sum_k r_a(k) r_b(k)) over lags k up to n/5 (at most 10), capped at n: a correlation of
    two series that each resemble their neighbours carries less information than n independent pairs.
    """
    n = len(a)
    max_lag = min(10, n // 5)
    if max_lag < 1:
        return float(n)
    inflation = 1.0 + 2.0 * float(_autocorrelation(a, max_lag) @ _autocorrelation(b, max_lag))
    return float(min(n, n / max(inflation, 1e-9)))


def change_correlation(x: np.ndarray, y: np.ndarray, *, level: float = 0.95) -> ChangeCorrelation:
    """Rank correlation of the changes of two series observed at the same ordered checkpoints.

    Differences remove the shared trend that makes any two monotone series correlate. The interval is
    tanh(atanh(rho) +- z * sqrt(1.06 / (n_eff - 3))) (Fieller, Hartley & Pearson's variance for Spearman's
    rho), with n_eff from :func:`effective_n`; NaN when n_eff <= 3 (fewer than about 5 checkpoints) or a
    series does not change. n_eff is at most the number of non-zero changes of either series: a score that
    stays put between most checkpoints (a task at 0) has tied ranks there, which carry no information, and
    counting them made the interval exclude 0 in about 18% of null runs instead of 5%.
    """
    dx = np.diff(np.asarray(x, dtype=float))
    dy = np.diff(np.asarray(y, dtype=float))
    n = len(dx)
    nan = ChangeCorrelation(float("nan"), float("nan"), float("nan"), float("nan"), n, float("nan"))
    if n < 3 or np.ptp(dx) == 0 or np.ptp(dy) == 0:
        return nan
    rx, ry = stats.rankdata(dx), stats.rankdata(dy)
    rho = float(np.corrcoef(rx, ry)[0, 1])
    n_eff = min(effective_n(rx, ry), float(np.count_nonzero(dx)), float(np.count_nonzero(dy)))
    if n_eff <= 3:
        return ChangeCorrelation(rho, float("nan"), float("nan"), float("nan"), n, n_eff)
    se = math.sqrt(1.06 / (n_eff - 3))
    z = math.atanh(float(np.clip(rho, -0.999999, 0.999999)))
    q = float(stats.norm.ppf(0.5 + level / 2))
    p_value = float(2 * stats.norm.sf(abs(z) / se))
    return ChangeCorrelation(rho, math.tanh(z - q * se), math.tanh(z + q * se), p_value, n, n_eff)


# -- does a candidate predict better than the baseline? ----------------------------------------------------


def _block_ids(groups: np.ndarray, block: int) -> np.ndarray:
    """Consecutive blocks of ``block`` points inside each group (points already in order within groups)."""
    ids = np.empty(len(groups), dtype=int)
    next_id = 0
    for g in dict.fromkeys(groups.tolist()):
        idx = np.flatnonzero(groups == g)
        ids[idx] = next_id + np.arange(len(idx)) // block
        next_id = int(ids[idx].max()) + 1
    return ids


def beats_baseline(
    loss_candidates: np.ndarray,
    loss_baseline: np.ndarray,
    groups: np.ndarray | None = None,
    *,
    n_sim: int = 4000,
    seed: int = 0,
) -> np.ndarray:
    """Adjusted one-sided p-values that each candidate's per-point loss is lower than the baseline's.

    ``loss_candidates`` is (K, n), e.g. squared out-of-sample errors; ``loss_baseline`` (n,). With
    d = candidate - baseline per point, the statistic is -mean(d) / sqrt(mean(d^2) / n). Under the null a
    candidate is no better than the baseline and d is symmetric about 0; points are flipped in blocks of
    about n^(1/3) consecutive points of a group (a run, in checkpoint order), the same flips for every
    candidate, and each p-value compares the candidate's statistic with the maximum over candidates. With
    at most 12 blocks every flip pattern is enumerated (then the smallest possible p-value is 2^-blocks:
    few checkpoints cannot show that anything beats the loss, and the test says so by not rejecting).
    """
    d = np.atleast_2d(np.asarray(loss_candidates, dtype=float)) - np.asarray(loss_baseline, dtype=float)[None, :]
    k, n = d.shape
    if n < 2 or k == 0:
        return np.full(k, np.nan)
    groups = np.zeros(n, dtype=int) if groups is None else np.asarray(groups)
    blocks = _block_ids(groups, max(1, round(n ** (1 / 3))))
    n_blocks = int(blocks.max()) + 1
    scale = np.sqrt((d**2).mean(axis=1) / n)
    scale = np.where(scale > 0, scale, np.inf)
    observed = -d.mean(axis=1) / scale
    if n_blocks <= 12:
        flips = np.array(list(itertools.product((1.0, -1.0), repeat=n_blocks)))
    else:
        flips = np.random.default_rng(seed).choice((1.0, -1.0), size=(n_sim, n_blocks))
    # sum_i flip(block_i) * d_ki for every flip pattern: flips (F, B) @ per-block sums (B, K)
    block_sums = np.zeros((n_blocks, k))
    np.add.at(block_sums, blocks, d.T)
    simulated = -(flips @ block_sums) / n / scale[None, :]
    maxima = np.sort(simulated.max(axis=1))
    exceed = len(maxima) - np.searchsorted(maxima, observed - 1e-12, side="left")
    if n_blocks <= 12:
        return exceed / len(maxima)  # exact: the observed pattern is among the enumerated ones
    return (1.0 + exceed) / (1.0 + len(maxima))


def holm(p_values: list[float]) -> np.ndarray:
    """Holm's step-down adjustment: family-wise error control under any dependence between the tests."""
    p = np.asarray(p_values, dtype=float)
    m = len(p)
    if m == 0:
        return p
    order = np.argsort(p)
    adjusted = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out = np.empty(m)
    out[order] = adjusted
    return out
