"""Predictor ranking: which internal signal predicts a downstream score best out of sample, and whether it
beats the loss.

Each signal is scored by the leave-one-out error of a monotone fit whose direction is chosen without the
held-out point, and tested against the loss with a Holm adjustment for the number of signals tried
(:func:`analysis.significance.beats_baseline`). Also the one-sentence verdict the views print.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from analysis import significance as sig
from analysis.divergence.alignment import align, finite_pairs
from analysis.divergence.correlation import spearman
from analysis.divergence.frames import POOLED, RANKING_COLUMNS, check_frame, check_metric, empty_frame
from analysis.divergence.isotonic import isotonic_fit
from analysis.divergence.metric_roles import signal_metrics


def _loo_errors(x: np.ndarray, y: np.ndarray, held_out: np.ndarray | None = None) -> np.ndarray:
    """Leave-one-out errors of a monotone fit of y on x, the direction chosen without the held-out point.

    Each point in ``held_out`` (default: all) is predicted by the isotonic fit on all the others, increasing
    or decreasing as Spearman's rho of those others says, so the held-out point never picks its own
    direction. Returns y - prediction at each held-out point.
    """
    n = len(x)
    held_out = np.arange(n) if held_out is None else held_out
    errors = np.empty(len(held_out))
    mask = np.ones(n, dtype=bool)
    for k, i in enumerate(held_out):
        mask[i] = False
        xs, ys = x[mask], y[mask]
        rho = spearman(xs, ys)
        ux, fit = isotonic_fit(xs, ys, increasing=not (np.isfinite(rho) and rho < 0))
        errors[k] = y[i] - np.interp(x[i], ux, fit)
        mask[i] = True
    return errors


def _held_out(n: int, max_held_out: int) -> np.ndarray:
    """Every index, or ``max_held_out`` evenly spaced ones (bounds the cost at that many fits)."""
    if n <= max_held_out:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, max_held_out).round()).astype(int)


def _r2(errors: np.ndarray, y: np.ndarray, held_out: np.ndarray) -> float:
    """1 - SSE / SSE of predicting each held-out point by the mean of the others."""
    loo_mean = (y.sum() - y[held_out]) / (len(y) - 1)
    baseline = float(((y[held_out] - loo_mean) ** 2).sum())
    return 1.0 - float((errors**2).sum()) / baseline if baseline > 0 else float("nan")


def _rank_one(run: str, predictor: str, downstream: str, points: pd.DataFrame, is_loss: bool) -> dict:
    """One ranking row: a predictor's rank correlation with the score and its leave-one-out fit error."""
    a = points["left"].to_numpy(dtype=float)
    b = points["right"].to_numpy(dtype=float)
    rho = spearman(a, b)
    held = _held_out(len(a), 200)
    errors = _loo_errors(a, b, held)
    return {
        "run": run,
        "predictor": predictor,
        "downstream": downstream,
        "n": len(a),
        "spearman": rho,
        "abs_spearman": abs(rho),
        "sign": 0 if not np.isfinite(rho) or rho == 0 else int(np.sign(rho)),
        "loo_rmse": float(np.sqrt(np.mean(errors**2))),
        "loo_r2": _r2(errors, b, held),
        "is_loss": is_loss,
    }


def _versus_loss(aligned: dict[str, pd.DataFrame], loss_metric: str, names: list[str], n_sim: int) -> dict[str, float]:
    """Holm-adjusted p-values that each candidate's out-of-sample error is below the loss's.

    Each candidate is compared with the loss on the checkpoints both have, the loss's leave-one-out errors
    recomputed on exactly those (:func:`analysis.significance.beats_baseline`), then the p-values are
    adjusted by Holm's step-down for the number of candidates tried. Returns {candidate: p_adjusted}.
    """
    key = ["run", "x"]
    loss_points = aligned[loss_metric][[*key, "left", "right"]].rename(columns={"left": "loss"})
    raw: dict[str, float] = {}
    baselines: dict[tuple, np.ndarray] = {}
    for name in names:
        shared = loss_points.merge(aligned[name][[*key, "left"]], on=key).sort_values(key, ignore_index=True)
        if len(shared) < 4:
            continue
        y = shared["right"].to_numpy(dtype=float)
        points = tuple(zip(shared["run"], shared["x"], strict=True))  # candidates on the same points share it
        if points not in baselines:
            baselines[points] = _loo_errors(shared["loss"].to_numpy(dtype=float), y) ** 2
        base = baselines[points]
        errors = _loo_errors(shared["left"].to_numpy(dtype=float), y) ** 2
        raw[name] = float(sig.beats_baseline(errors[None, :], base, shared["run"].to_numpy(), n_sim=n_sim)[0])
    return dict(zip(raw, sig.holm(list(raw.values())), strict=True))


def _candidate_names(
    frame: pd.DataFrame, downstream_metric: str, candidates: str | Sequence[str] | None, loss_metric: str | None
) -> list[str]:
    """The metrics to rank, each checked against the data (every signal for None), the loss added last when
    it is not among them."""
    if candidates is None:
        names = signal_metrics(list(frame["metric"].astype(str).unique()), downstream_metric)
    else:
        names = [candidates] if isinstance(candidates, str) else list(candidates)
        for name in names:
            check_metric(frame, name)
    if loss_metric is not None:
        check_metric(frame, loss_metric)
        if loss_metric not in names:
            names.append(loss_metric)
    return names


def _mark_beats_loss(
    rows: list[dict], aligned: dict[str, pd.DataFrame], loss_metric: str | None, alpha: float, n_sim: int
) -> None:
    """Give every pooled row its ``beats_loss_p`` and ``beats_loss`` (NaN and False where nothing was tested)."""
    tested: dict[str, float] = {}
    if loss_metric is not None and loss_metric in aligned:
        others = [r["predictor"] for r in rows if not r["is_loss"]]
        tested = _versus_loss(aligned, loss_metric, others, n_sim) if others else {}
    for row in rows:
        p = tested.get(row["predictor"], float("nan"))
        row["beats_loss_p"] = p
        row["beats_loss"] = bool(p <= alpha) if np.isfinite(p) else False


def _best_first(rows: list[dict], run_rows: list[dict]) -> pd.DataFrame:
    """The pooled rows by out-of-sample fit, best first, then the per-run rows by run, best first in each."""
    parts = []
    for chunk, keys in ((rows, ["loo_r2", "abs_spearman"]), (run_rows, ["run", "loo_r2", "abs_spearman"])):
        if chunk:
            ascending = [True, False, False] if len(keys) == 3 else [False, False]
            parts.append(pd.DataFrame(chunk).sort_values(keys, ascending=ascending, na_position="last"))
    return pd.concat(parts, ignore_index=True).reindex(columns=RANKING_COLUMNS)


def predictor_ranking(
    frame: pd.DataFrame,
    downstream_metric: str,
    *,
    candidates: Sequence[str] | None = None,
    loss_metric: str | None = None,
    per_run: bool = False,
    min_points: int = 4,
    alpha: float = 0.05,
    x: str = "step",
    n_params: int | float | Mapping[str, float] | None = None,
    log_interp: bool = True,
    n_sim: int = 4000,
) -> pd.DataFrame:
    """How well each signal predicts the downstream score out of sample, best first, and whether it beats
    the loss.

    Each candidate is aligned to the downstream checkpoints (``align``: interpolated at the checkpoints'
    x, never extrapolated; a candidate sparser than the score is used only where it was measured) and
    checkpoints of all runs are pooled (``run`` = ``"(pooled)"``); with
    ``per_run`` each run is also scored alone, in rows after the pooled ones. Per candidate: ``spearman``
    (signed, descriptive) and ``abs_spearman``, ``sign`` (+1: higher signal, higher score), and the
    leave-one-out error of a monotone (isotonic) fit whose direction is chosen inside each fold, without the
    held-out point: ``loo_rmse`` and ``loo_r2`` = 1 - SSE / SSE of predicting each point by the mean of the
    others (above 200 points, 200 evenly spaced points are held out). With ``loss_metric``, the loss is
    scored too (``is_loss``) and every other candidate is tested against it on the checkpoints all of them
    share: ``beats_loss_p`` is the probability, adjusted for the number of candidates, of an advantage this
    large in out-of-sample squared error if the candidate were no better than the loss
    (:func:`analysis.significance.beats_baseline`); ``beats_loss`` is ``beats_loss_p <= alpha``. With few
    checkpoints nothing can beat the loss, and the column says so. Unconverged estimates are left out.
    ``candidates=None`` takes every other metric except lm-eval scores and schedule bookkeeping.
    Sorted by loo_r2 (best first), then abs_spearman.

    Columns: run, predictor, downstream, n, spearman, abs_spearman, sign, loo_rmse, loo_r2, is_loss,
    beats_loss_p, beats_loss.
    """
    check_frame(frame)
    check_metric(frame, downstream_metric)
    if min_points < 4:
        raise ValueError(f"min_points={min_points}: leave-one-out with a chosen direction needs at least 4 points")
    names = _candidate_names(frame, downstream_metric, candidates, loss_metric)
    rows: list[dict] = []
    run_rows: list[dict] = []
    aligned: dict[str, pd.DataFrame] = {}
    for name in names:
        if name == downstream_metric:
            continue
        aligned_points = align(
            frame, name, downstream_metric, x=x, n_params=n_params, log_interp=log_interp, measured_only=True
        )  # a signal computed at a few checkpoints counts there only, not at interpolated ones
        points = finite_pairs(aligned_points)
        if len(points) >= min_points:
            aligned[name] = points
            rows.append(_rank_one(POOLED, name, downstream_metric, points, name == loss_metric))
        if per_run:
            for run, group in points.groupby("run", sort=True):
                if len(group) >= min_points:
                    run_rows.append(_rank_one(run, name, downstream_metric, group, name == loss_metric))
    if not rows and not run_rows:
        return empty_frame(RANKING_COLUMNS)
    _mark_beats_loss(rows, aligned, loss_metric, alpha, n_sim)
    out = _best_first(rows, run_rows)
    out["beats_loss"] = out["beats_loss"].fillna(False).astype(bool)
    out.attrs["alpha"] = alpha
    return out


def within_runs(
    frame: pd.DataFrame, signal: str, downstream_metric: str, loss_metric: str, *, x: str = "step", n_sim: int = 4000
) -> dict[str, float]:
    """For each run alone, the p-value that ``signal`` predicts the score out of sample better than the loss.

    The pooled ranking asks whether a signal predicts the score across the runs' checkpoints together. When
    the runs reach the same loss with different scores, any signal that tells the runs apart and trends with
    training wins that test, whether or not it follows the score within a run. This asks the within-run
    question: the ranking's own comparison (:func:`_versus_loss`) on one run's checkpoints at a time. Runs
    with fewer than 4 shared checkpoints are left out. Returns {run: p} (one test per run, unadjusted).
    """
    aligned = {
        name: finite_pairs(align(frame, name, downstream_metric, x=x, measured_only=True))
        for name in (signal, loss_metric)
    }
    out: dict[str, float] = {}
    for run in sorted(set(aligned[signal]["run"]) & set(aligned[loss_metric]["run"])):
        one_run = {name: points[points["run"] == run] for name, points in aligned.items()}
        tested = _versus_loss(one_run, loss_metric, [signal], n_sim)  # one candidate: Holm leaves p as is
        if signal in tested:
            out[str(run)] = float(tested[signal])
    return out


def ranking_verdict(ranking: pd.DataFrame, loss_metric: str | None) -> str:
    """One plain sentence: which signals beat the loss out of sample, or that none does."""
    pooled = ranking[ranking["run"] == POOLED] if len(ranking) else ranking
    if loss_metric is None or not len(pooled) or not pooled["is_loss"].any():
        return "No loss to compare with: the ranking orders signals by out-of-sample fit only."
    alpha = ranking.attrs.get("alpha", 0.05)
    winners = pooled[pooled["beats_loss"].astype(bool)]
    if len(winners):
        named = ", ".join(f"{r.predictor} (p = {r.beats_loss_p:.3g})" for r in winners.itertuples())
        return (
            f"Pooled over the selected runs' checkpoints, predicts {pooled.iloc[0]['downstream']} better than "
            f"{loss_metric} out of sample: {named}. With runs at the same loss, this credits a signal that tells "
            "the runs apart; the Geometry and Pathways pages also test the best one within each run."
        )
    tested = pooled["beats_loss_p"].notna().sum()
    if tested == 0:
        return f"No signal shares enough checkpoints with {loss_metric} to be compared with it."
    return (
        f"No signal predicts {pooled.iloc[0]['downstream']} better than {loss_metric} out of sample "
        f"({tested} tested, α = {alpha:g}, adjusted for the number tried)."
    )
