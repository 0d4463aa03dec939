"""Forecast a run's downstream score at later checkpoints from its early ones, with prediction intervals.

Three forms (``FORMS``), each fitted by least squares on the checkpoints up to ``fit_until``:

- ``power``: score = a - b * x^(-c), a saturating power law in x (tokens, steps or FLOPs; x > 0).
  Assumes the score keeps improving with diminishing returns toward an asymptote a, with no late jump.
- ``log``: score = a + b * ln(x), a log-law. Assumes steady improvement per doubling of x, no saturation;
  it keeps rising past any ceiling, so it overshoots a score that saturates.
- ``two-step``: loss = E + A * x^(-alpha) (a power law in x), then score = lo + (hi - lo) *
  sigmoid(k * (m - loss)) fitted across the checkpoints' (loss, score) pairs (the model-ladder form). Assumes
  the score is a fixed S-shaped function of the loss, so a run whose score moves at constant loss
  (grokking) breaks it. With ``proxy`` set, the same through that metric instead of the loss (its direction
  from :mod:`analysis.directions`).

Scores whose lower values are better (perplexity) are fitted in their improving direction and mapped back; a
score measured within [0, 1] (an accuracy) has its prediction and interval kept within [0, 1]. A perplexity
used as the loss of the two-step form enters as its logarithm (the loss it exponentiates).

**Intervals.** The delta method with a t quantile: the variance of a prediction is g' C g + s^2, where C is
the fitted parameters' covariance (least squares, scaled by the residual variance), g the prediction's
gradient in those parameters, and s^2 the residual variance (the scatter a new checkpoint will have); the
``level`` interval is the prediction +- t(n - p) times its square root, for n checkpoints and p parameters.
For the two-step form both stages add: the loss curve's parameter variance carried through the slope of
the sigmoid, plus the sigmoid's own. It widens with the horizon because g grows as the curve extrapolates.
It was chosen over a residual bootstrap because it covered better in simulation (power law, 8 and 14
checkpoints fitted, extrapolated 7x past the last: 0.87 and 0.93 at nominal 0.90, against 0.85 and 0.87
for the bootstrap) at a thousandth of the cost. Residuals are taken as independent: scatter correlated
along the run makes the interval too narrow, which the backtest (:func:`backtest`) shows. A fit that does
not converge says so (``converged``); a parameter that the data cannot pin down (an infinite variance, or a
fit that ends on a parameter's bound, such as a power law whose exponent hits its floor) makes the fit not
``identifiable``, and the page says its intervals are not to be trusted.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import pandas as pd
from scipy import stats
from scipy.optimize import OptimizeWarning, curve_fit

from analysis.directions import orientation
from analysis.settings import unconverged

FORECAST_COLUMNS = [
    "run", "score", "method", "x", "predicted", "lo", "hi", "level", "measured", "covered", "abs_error",
    "n_fit", "fit_until", "converged", "identifiable",
]  # fmt: skip


# -- the curves ------------------------------------------------------------------------------------------------


def power_law(x: np.ndarray, a: float, b: float, c: float) -> np.ndarray:
    """a - b * x^(-c): rises toward a as x grows (b, c > 0)."""
    return a - b * np.power(x, -c)


def log_law(x: np.ndarray, a: float, b: float) -> np.ndarray:
    """a + b * ln(x)."""
    return a + b * np.log(x)


def sigmoid_of(loss: np.ndarray, lo: float, hi: float, k: float, m: float) -> np.ndarray:
    """lo + (hi - lo) / (1 + exp(-k (m - loss))): falls from hi to lo as the loss rises past m (k > 0)."""
    return lo + (hi - lo) / (1.0 + np.exp(-np.clip(k * (m - loss), -60, 60)))


@dataclass(frozen=True)
class Fit:
    """One least-squares fit: the parameters, whether it converged and whether each is pinned down."""

    fn: Callable[..., np.ndarray]
    params: np.ndarray
    converged: bool
    identifiable: bool
    residuals: np.ndarray
    cov: np.ndarray

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.fn(np.asarray(x, dtype=float), *self.params)


def _curve_fit(fn, x, y, p0, bounds) -> Fit:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OptimizeWarning)
        try:
            params, cov = curve_fit(fn, x, y, p0=p0, bounds=bounds, maxfev=20000)
        except (RuntimeError, ValueError):
            k = len(p0)
            return Fit(fn, np.asarray(p0, dtype=float), False, False, np.full(len(x), np.nan), np.full((k, k), np.inf))
    residuals = y - fn(x, *params)
    identifiable = (
        bool(np.all(np.isfinite(np.diag(cov))))
        and len(x) > len(params)
        and not _at_bound(params, bounds)
        and not _traded_off(cov)
    )
    return Fit(fn, params, bool(np.all(np.isfinite(residuals))), identifiable, residuals, cov)


def _traded_off(cov: np.ndarray, limit: float = 0.9999) -> bool:
    """Whether two parameters are so correlated that the data only pin down a combination of them (a late
    jump fitted by a power law: its ceiling and scale move together over orders of magnitude). Clean power-law
    and log-law fits of 8-20 points stay below 0.995 in simulation; such a jump reaches 0.99999999."""
    sd = np.sqrt(np.diag(cov))
    if len(sd) < 2 or not np.all(sd > 0):
        return False
    corr = cov / np.outer(sd, sd)
    np.fill_diagonal(corr, 0.0)
    return bool(np.abs(corr).max() > limit)


def _at_bound(params: np.ndarray, bounds) -> bool:
    """Whether a fitted parameter sits on one of its finite bounds (a power law's exponent at its floor, a
    scale at 0): the optimum is then on the boundary, and the covariance read off there, hence the interval,
    does not describe how well the data pin the curve down."""
    lo, hi = (np.broadcast_to(np.asarray(b, dtype=float), params.shape) for b in bounds)
    tol = 1e-6 * np.maximum(1.0, np.abs(params))
    return bool(np.any(np.isfinite(lo) & (params - lo <= tol)) or np.any(np.isfinite(hi) & (hi - params <= tol)))


def fit_power(x: np.ndarray, y: np.ndarray) -> Fit:
    """Fit a - b x^(-c) with b, c > 0 (x > 0)."""
    span = max(float(np.ptp(y)), 1e-6)
    p0 = [float(y.max()) + 0.1 * span, span, 0.3]
    bounds = ([-np.inf, 0.0, 1e-4], [np.inf, np.inf, 5.0])
    return _curve_fit(power_law, x, y, p0, bounds)


def fit_log(x: np.ndarray, y: np.ndarray) -> Fit:
    """Fit a + b ln(x) (x > 0)."""
    b, a = np.polyfit(np.log(x), y, 1)
    return _curve_fit(log_law, x, y, [a, b], (-np.inf, np.inf))


def fit_sigmoid(loss: np.ndarray, y: np.ndarray) -> Fit:
    """Fit lo + (hi - lo) sigmoid(k (m - loss)) with k > 0 and lo <= hi inside a little past the data."""
    span = max(float(np.ptp(y)), 1e-6)
    lo0, hi0 = float(y.min()), float(y.max())
    m0 = float(np.median(loss))
    k0 = 4.0 / max(float(np.ptp(loss)), 1e-6)
    bounds = ([lo0 - span, lo0 - span, 1e-6, -np.inf], [hi0 + span, hi0 + span, np.inf, np.inf])
    return _curve_fit(sigmoid_of, loss, y, [lo0, hi0, k0, m0], bounds)


def fit_loss_power(x: np.ndarray, loss: np.ndarray) -> Fit:
    """Fit loss = E + A x^(-alpha): the power law of the two-step form, as -(power law) of -loss."""
    inner = fit_power(x, -loss)
    flipped = lambda x, a, b, c: -power_law(x, a, b, c)  # noqa: E731 (a curve with the same parameters)
    return Fit(flipped, inner.params, inner.converged, inner.identifiable, -inner.residuals, inner.cov)


# -- forecasting one series -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Forecast:
    """Predictions at ``at`` with their prediction interval, and how far the fit can be trusted."""

    method: str
    at: np.ndarray
    predicted: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    level: float
    n_fit: int
    converged: bool
    identifiable: bool
    curve_x: np.ndarray = field(default_factory=lambda: np.empty(0))
    curve: np.ndarray = field(default_factory=lambda: np.empty(0))
    curve_lo: np.ndarray = field(default_factory=lambda: np.empty(0))
    curve_hi: np.ndarray = field(default_factory=lambda: np.empty(0))


METHODS = ("power", "log", "two-step")
# What each form assumes, in the words the Forecast page shows beside it.
ASSUMPTIONS = {
    "power": "score = a - b·x^(-c): keeps improving with diminishing returns toward a ceiling a; no late jump.",
    "log": "score = a + b·ln(x): the same gain per doubling of x, no ceiling; overshoots a score that saturates.",
    "two-step": "loss = E + A·x^(-α), then score = an S-curve of the loss: the score is a fixed function of the loss, "
    "so a score that moves at constant loss (grokking) breaks it.",
}
_N_PARAMS = {"power": 3, "log": 2, "two-step": 4}


def _gradient(fn: Callable[[np.ndarray], np.ndarray], params: np.ndarray) -> np.ndarray:
    """Central-difference gradient of fn(params) (a vector of predictions) in each parameter: (k, n_params)."""
    cols = []
    for i in range(len(params)):
        h = 1e-6 * max(1.0, abs(float(params[i])))
        up, down = params.copy(), params.copy()
        up[i] += h
        down[i] -= h
        cols.append((fn(up) - fn(down)) / (2 * h))
    return np.stack(cols, axis=1)


def _residual_variance(fit: Fit) -> float:
    n, p = len(fit.residuals), len(fit.params)
    return float((fit.residuals**2).sum() / max(n - p, 1))


def forecast_series(
    x: npt.ArrayLike,
    y: npt.ArrayLike,
    at: npt.ArrayLike,
    *,
    method: str = "power",
    via: npt.ArrayLike | None = None,
    level: float = 0.9,
    higher_is_better: bool = True,
    curve_points: int = 60,
) -> Forecast:
    """Fit ``method`` to (x, y) (and ``via``, the loss or proxy at the same x, for ``two-step``) and predict y
    at ``at`` with a ``level`` prediction interval (delta method, t quantile; see the module docstring).

    ``higher_is_better=False`` fits the score's improving direction (-y) and maps the answer back. Also
    returns the fitted curve and its band on a grid from the first x to the furthest of ``at``.
    """
    if method not in METHODS:
        raise ValueError(f"forecast method {method!r}: choose one of {', '.join(METHODS)}")
    if not 0 < level < 1:
        raise ValueError(f"level={level} must be between 0 and 1")
    # Arrays under names of their own: the arguments stay the sequences the caller passed.
    xs, ys, ats = (np.asarray(v, dtype=float) for v in (x, y, at))
    sign = 1.0 if higher_is_better else -1.0
    ys = sign * ys
    loss: np.ndarray | None = None
    if method == "two-step":
        if via is None:
            raise ValueError("the two-step forecast needs the loss (or a proxy) at the same checkpoints")
        loss = np.asarray(via, dtype=float)
    keep = (xs > 0) & np.isfinite(ys) & (np.isfinite(loss) if loss is not None else True)
    xs, ys = xs[keep], ys[keep]
    loss = loss[keep] if loss is not None else None
    p = _N_PARAMS[method]
    if len(xs) < p + 2:
        raise ValueError(
            f"{len(xs)} checkpoints with x > 0 to fit the {method} form ({p} parameters): fit on at least {p + 2}"
        )
    fits = _fits(method, xs, ys, loss)
    converged = all(f.converged for f in fits)
    identifiable = all(f.identifiable for f in fits)
    grid = np.geomspace(xs.min(), max(xs.max(), float(np.max(ats)) if len(ats) else xs.max()), curve_points)
    targets = np.concatenate([ats, grid])
    if not converged:
        nan = np.full(len(targets), np.nan)
        return _forecast(method, ats, nan, nan, nan, level, len(xs), False, identifiable, grid)
    point, variance = _prediction_variance(fits, targets)
    dof = min(len(xs) - len(f.params) for f in fits)
    half = float(stats.t.ppf(0.5 + level / 2, max(dof, 1))) * np.sqrt(variance)
    lo, hi = sign * (point - half), sign * (point + half)
    lo, hi, point = np.minimum(lo, hi), np.maximum(lo, hi), sign * point
    if ((sign * ys >= 0) & (sign * ys <= 1)).all():  # a share (accuracy, exact match) stays a share
        lo, hi, point = np.clip(lo, 0, 1), np.clip(hi, 0, 1), np.clip(point, 0, 1)
    return _forecast(method, ats, point, lo, hi, level, len(xs), True, identifiable, grid)


def _fits(method: str, x: np.ndarray, y: np.ndarray, via: np.ndarray | None) -> list[Fit]:
    if method == "power":
        return [fit_power(x, y)]
    if method == "log":
        return [fit_log(x, y)]
    if via is None:
        raise ValueError("the two-step forecast needs the loss (or a proxy) at the same checkpoints")
    return [fit_loss_power(x, via), fit_sigmoid(via, y)]


def _prediction_variance(fits: list[Fit], at: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Point predictions at ``at`` and their prediction variance (parameter part plus new-point scatter)."""
    if len(fits) == 1:
        (fit,) = fits
        g = _gradient(lambda q: fit.fn(at, *q), fit.params)
        var = np.einsum("ki,ij,kj->k", g, fit.cov, g) + _residual_variance(fit)
        return fit(at), var
    loss_fit, score_fit = fits
    loss = loss_fit(at)
    g_loss = _gradient(lambda q: loss_fit.fn(at, *q), loss_fit.params)
    var_loss = np.einsum("ki,ij,kj->k", g_loss, loss_fit.cov, g_loss) + _residual_variance(loss_fit)
    h = 1e-6 * np.maximum(1.0, np.abs(loss))
    slope = (score_fit(loss + h) - score_fit(loss - h)) / (2 * h)
    g_score = _gradient(lambda q: score_fit.fn(loss, *q), score_fit.params)
    var_score = np.einsum("ki,ij,kj->k", g_score, score_fit.cov, g_score) + _residual_variance(score_fit)
    return score_fit(loss), slope**2 * var_loss + var_score


def _forecast(method, at, point, lo, hi, level, n_fit, converged, identifiable, grid) -> Forecast:
    k = len(at)
    return Forecast(
        method=method,
        at=at,
        predicted=point[:k],
        lo=lo[:k],
        hi=hi[:k],
        level=level,
        n_fit=n_fit,
        converged=converged,
        identifiable=identifiable,
        curve_x=grid,
        curve=point[k:],
        curve_lo=lo[k:],
        curve_hi=hi[k:],
    )


# -- forecasting from the long table --------------------------------------------------------------------------


def _is_perplexity(metric: str) -> bool:
    short = metric.rsplit("/", 1)[-1].split(",", 1)[0].lower()
    return short in {"ppl", "perplexity", "word_perplexity", "byte_perplexity", "token_perplexity"} or short.endswith(
        "_perplexity"
    )


def score_series(frame: pd.DataFrame, run: str, metric: str, x: str) -> pd.DataFrame:
    """One run's ``metric`` by ``x`` (columns x, value), unconverged values left out, sorted by x."""
    rows = frame[(frame["run"].astype(str) == run) & (frame["metric"].astype(str) == metric)]
    rows = rows[~unconverged(rows)]
    rows = rows.assign(x=pd.to_numeric(rows[x], errors="coerce"), value=pd.to_numeric(rows["value"]))
    rows = rows.dropna(subset=["x", "value"])
    return rows.groupby("x", as_index=False)["value"].mean().sort_values("x", ignore_index=True)


def forecast(
    frame: pd.DataFrame,
    run: str,
    score: str,
    *,
    method: str = "power",
    x: str = "step",
    fit_until: float | None = None,
    at: Sequence[float] | None = None,
    via: str | None = None,
    level: float = 0.9,
) -> tuple[pd.DataFrame, Forecast]:
    """Forecast ``score`` of ``run`` from the checkpoints with x <= ``fit_until`` (default: all).

    ``frame`` is the long table with one setting per metric (``analysis.settings.select_settings``).
    ``at`` defaults to every checkpoint after ``fit_until`` and the run's last one; predictions at a
    measured checkpoint carry the measurement, whether the interval covered it, and the absolute error.
    ``via`` is the loss or proxy metric of the two-step form (interpolated at the score's checkpoints on
    log-x). Returns (one row per prediction, FORECAST_COLUMNS; the Forecast with its fitted curve).
    """
    for name in [score, *([via] if via else [])]:
        if not (frame["metric"].astype(str) == name).any():
            raise ValueError(f"metric {name!r} not in the data for run {run!r}")
    if x not in ("step", "tokens", "flops") or x not in frame:
        raise ValueError(f"x-axis {x!r}: choose step or tokens (flops needs a flops column)")
    series = score_series(frame, run, score, x)
    if series.empty:
        raise ValueError(f"run {run!r} has no {score} with a known {x}")
    last = float(series["x"].max())
    fit_until = last if fit_until is None else float(fit_until)
    train = series[series["x"] <= fit_until]
    if at is None:
        later = series.loc[series["x"] > fit_until, "x"].tolist()
        at = sorted(set(later) | {last})
    targets = np.asarray(list(at), dtype=float)
    via_values: np.ndarray | None = None
    if method == "two-step":
        if via is None:
            raise ValueError("the two-step forecast needs a loss or proxy metric (via)")
        loss = score_series(frame, run, via, x)
        loss = loss[loss["x"] > 0]
        if len(loss) < 2:
            raise ValueError(f"run {run!r} has fewer than 2 values of {via} to interpolate at its checkpoints")
        train = train[(train["x"] >= loss["x"].min()) & (train["x"] <= loss["x"].max())]
        values = loss["value"].to_numpy(dtype=float)
        if _is_perplexity(via) and (values > 0).all():
            values = np.log(values)  # a perplexity is exp(loss): the power law and the sigmoid are in the loss
        via_values = np.interp(np.log(train["x"].clip(lower=1e-300)), np.log(loss["x"]), values)
        if orientation(via, frame) > 0:  # a higher-is-better proxy: fit its falling mirror image
            via_values = -via_values
    result = forecast_series(
        train["x"], train["value"], targets, method=method, via=via_values, level=level,
        higher_is_better=orientation(score, frame) > 0,
    )  # fmt: skip
    measured = series.set_index("x")["value"]
    rows = pd.DataFrame(
        {
            "run": run,
            "score": score,
            "method": method if via is None else f"{method} via {via}",
            "x": targets,
            "predicted": result.predicted,
            "lo": result.lo,
            "hi": result.hi,
            "level": level,
            "measured": [float(measured.get(a, np.nan)) for a in targets],
            "n_fit": result.n_fit,
            "fit_until": fit_until,
            "converged": result.converged,
            "identifiable": result.identifiable,
        }
    )
    inside = (rows["lo"] <= rows["measured"]) & (rows["measured"] <= rows["hi"])
    rows["covered"] = inside.where(rows["measured"].notna())
    rows["abs_error"] = (rows["predicted"] - rows["measured"]).abs()
    return rows[FORECAST_COLUMNS], result
