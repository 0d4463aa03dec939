"""Divergence windows: spans of checkpoints where loss and a downstream score part ways.

A grokking window has a flat loss (within a tolerance, :func:`flat_tolerance`) while the score improves; an
inverse window has an improving loss while the score gets worse. Every candidate span of a run is tested at
once with a family-wise error rate (:func:`analysis.significance.span_test`). Also the sentences and the
caption the views print for the windows found.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from analysis import significance as sig
from analysis.directions import orientation
from analysis.divergence.alignment import align, finite_pairs
from analysis.divergence.frames import WINDOW_COLUMNS, empty_frame

TOL_OF = ("value", "range", "absolute")


def flat_tolerance(loss: np.ndarray, loss_tol: float, tol_of: str) -> np.ndarray:
    """How far the loss may move over a span that starts at each point and still count as flat.

    ``"value"``: ``loss_tol`` of the loss where the span starts (a 2% wobble of a loss of 3 is flat).
    ``"range"``: ``loss_tol`` of the run's whole loss range, max - min over its points: for a loss that
    falls to near zero, as a training loss does once a model fits its data, where any relative wobble of
    a tiny value is large; flat then means "moves by less than 2% of what it moved over the run".
    ``"absolute"``: ``loss_tol`` in the loss's own units.
    """
    loss = np.asarray(loss, dtype=float)
    if tol_of == "value":
        return loss_tol * np.abs(loss)
    if tol_of == "range":
        return np.full(len(loss), loss_tol * float(np.ptp(loss)) if len(loss) else 0.0)
    if tol_of == "absolute":
        return np.full(len(loss), float(loss_tol))
    raise ValueError(f"tol_of={tol_of!r}: use one of {', '.join(TOL_OF)}")


def _candidate_spans(loss: np.ndarray, loss_sign: float, tol: np.ndarray, min_points: int) -> dict[str, tuple]:
    """Index pairs (i, j), i < j, that qualify for each kind on the loss alone.

    grokking: the loss stays within ``tol[i]`` over the whole span (max - min of points i..j);
    inverse: the loss improved by more than ``tol[i]`` from i to j (``loss_sign`` = +1 when higher is better).
    """
    n = len(loss)
    i_idx, j_idx = np.triu_indices(n, k=max(1, min_points - 1))
    span_range = np.zeros((n, n))
    for i in range(n):
        span_range[i, i:] = np.maximum.accumulate(loss[i:]) - np.minimum.accumulate(loss[i:])
    flat = span_range[i_idx, j_idx] <= tol[i_idx]
    improved = loss_sign * (loss[j_idx] - loss[i_idx]) > tol[i_idx]
    return {"grokking": (i_idx[flat], j_idx[flat]), "inverse": (i_idx[improved], j_idx[improved])}


def _windows_of_run(
    xs: np.ndarray,
    loss: np.ndarray,
    score: np.ndarray,
    se: np.ndarray,
    *,
    loss_sign: float,
    score_sign: float,
    loss_tol: float,
    tol_of: str,
    alpha: float,
    min_points: int,
    n_sim: int,
    seed: int,
    paired: tuple[np.ndarray, int] | None = None,
) -> tuple[list[dict], str]:
    tol = flat_tolerance(loss, loss_tol, tol_of)
    spans = _candidate_spans(loss, loss_sign, tol, min_points)
    # grokking: the score improves (in its own direction) at flat loss; inverse: it worsens as loss improves.
    starts = np.concatenate([spans["grokking"][0], spans["inverse"][0]])
    ends = np.concatenate([spans["grokking"][1], spans["inverse"][1]])
    kinds = np.array(["grokking"] * len(spans["grokking"][0]) + ["inverse"] * len(spans["inverse"][0]))
    signs = np.where(kinds == "grokking", score_sign, -score_sign)
    cov, items = paired if paired is not None else (None, None)
    test = sig.span_test(score, se, starts, ends, signs, alpha=alpha, n_sim=n_sim, seed=seed, cov=cov, items=items)
    if test is None:
        return [], "none"
    out = []
    for kind in ("grokking", "inverse"):
        of_kind = kinds == kind
        keep = of_kind & (test.p_adjusted <= alpha)
        for k in sig.report_spans(test.start, test.end, keep, test.stat):
            a, b = int(test.start[k]), int(test.end[k])
            out.append(
                {
                    "kind": kind,
                    "start": float(xs[a]),
                    "end": float(xs[b]),
                    "n_points": b - a + 1,
                    "loss_change": float(loss[b] - loss[a]),
                    "loss_range": float(np.ptp(loss[a : b + 1])),
                    "downstream_change": float(test.change[k]),
                    "change_lo": float(test.change_lo[k]),
                    "change_hi": float(test.change_hi[k]),
                    "z_score": float(test.stat[k]),
                    "p_adjusted": float(test.p_adjusted[k]),
                    "n_spans": len(starts),
                }
            )
    return out, test.stderr_source


def _paired_cov(samples: pd.DataFrame | None, run: str, group: pd.DataFrame) -> tuple[np.ndarray, int] | None:
    """Covariance of a run's scores from its per-item results and the number of items, or None when they cannot
    stand for them.

    Needs the same items (at least 10) at every checkpoint of ``group`` and their mean equal to the score
    (the per-item values are what the score averages); anything else keeps the unpaired test.
    """
    if samples is None or not len(samples):
        return None
    mine = samples[samples["run"].astype(str) == str(run)]
    steps = group["step"].to_numpy()
    table = mine.pivot_table(index="sample_id", columns="step", values="value", aggfunc="first")
    if not set(steps) <= set(table.columns):
        return None
    items = table[list(steps)].dropna().to_numpy(dtype=float)
    score = group["right"].to_numpy(dtype=float)
    if len(items) < 10 or not np.allclose(items.mean(axis=0), score, rtol=1e-6, atol=1e-9):
        return None
    return sig.paired_covariance(items), len(items)


def divergence_windows(
    frame: pd.DataFrame,
    loss_metric: str,
    downstream_metric: str,
    *,
    loss_tol: float = 0.02,
    tol_of: str = "value",
    alpha: float = 0.05,
    min_points: int = 2,
    x: str = "step",
    n_params: int | float | Mapping[str, float] | None = None,
    log_interp: bool = True,
    n_sim: int = 2000,
    seed: int = 0,
    samples: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Spans of checkpoints where loss and downstream part ways, per run, with a controlled error rate.

    Points are the checkpoints where the downstream score was measured, with the loss interpolated there
    (``align``). Every span i..j of at least ``min_points`` points is a candidate:

    - **grokking**: the loss stays flat (max - min over the span <= tol, see :func:`flat_tolerance`:
      ``loss_tol`` times |loss_i| for ``tol_of="value"``, times the run's whole loss range for ``"range"``,
      or ``loss_tol`` itself for ``"absolute"``) and the score improves from i to j;
    - **inverse**: the loss improves by more than tol from i to j and the score gets worse.

    "Improves" follows each metric's direction (:mod:`analysis.directions`): a perplexity that falls
    improves. Every candidate's statistic is its score change over the combined stderr of its endpoints; the
    null distribution of the largest statistic over *all* candidates of the run is simulated from the
    stderrs (``n_sim`` runs, ``seed``; :func:`analysis.significance.span_test`), so the chance that a run
    with no real move gets any window is ``alpha`` whatever its number of checkpoints. A score without
    stderrs (a logged accuracy) is studentized by its own scatter, re-estimated in every simulated run.
    ``samples`` (run, step, sample_id, value: the score's per-item results, e.g. ``Store.sample_results``)
    makes the test paired where it can: when every checkpoint of a run scored the same items and their mean
    is the score, the changes' stderrs come from the items' covariance across checkpoints
    (:func:`analysis.significance.paired_covariance`): the same items at both ends, so much less noise
    than two independent stderrs, and more power at the same error rate (stderr_source "paired").
    Each move is reported once: the tightest significant spans around it, joined while the joined span is
    still significant, and of two that still share a stretch only the stronger is kept
    (:func:`analysis.significance.report_spans`); a window's numbers are its own test's.

    Columns: run, kind, start, end (x units), downstream_change (score_end - score_start, raw units),
    change_lo / change_hi (simultaneous bounds: each holds with probability >= 1 - alpha for every candidate
    at once, together a (1 - 2 alpha) interval; the improving end excludes 0 exactly when the window is
    significant), p_adjusted (family-wise over the run's n_spans candidates), z_score, n_points,
    loss_change (end - start), loss_range (inside the window), n_spans, stderr_source (reported, paired,
    scatter, reported+scatter).
    """
    if loss_tol < 0:
        raise ValueError(f"loss_tol={loss_tol} must be >= 0")
    if tol_of not in TOL_OF:
        raise ValueError(f"tol_of={tol_of!r}: use one of {', '.join(TOL_OF)}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha={alpha} must be between 0 and 1")
    if min_points < 2:
        raise ValueError(f"min_points={min_points}: a window needs at least 2 points")
    if n_sim < 100:
        raise ValueError(f"n_sim={n_sim}: simulate at least 100 null runs (1000+ for p-values near alpha)")
    points = align(frame, loss_metric, downstream_metric, x=x, n_params=n_params, log_interp=log_interp)
    loss_sign = orientation(loss_metric, frame)
    score_sign = orientation(downstream_metric, frame)
    rows: list[dict[str, Any]] = []
    for run, group in points.groupby("run", sort=True):
        group = finite_pairs(group).sort_values("x")
        if len(group) < min_points:
            continue
        found, source = _windows_of_run(
            paired=_paired_cov(samples, run, group),
            xs=group["x"].to_numpy(dtype=float),
            loss=group["left"].to_numpy(dtype=float),
            score=group["right"].to_numpy(dtype=float),
            se=group["right_stderr"].to_numpy(dtype=float),
            loss_sign=loss_sign,
            score_sign=score_sign,
            loss_tol=loss_tol,
            tol_of=tol_of,
            alpha=alpha,
            min_points=min_points,
            n_sim=n_sim,
            seed=seed,
        )
        rows.extend({"run": run, **w, "stderr_source": source} for w in found)
    out = pd.DataFrame(rows).sort_values(["run", "start", "kind"], ignore_index=True) if rows else None
    out = out[WINDOW_COLUMNS] if out is not None else empty_frame(WINDOW_COLUMNS)
    out.attrs["alpha"] = alpha
    out.attrs["n_sim"] = n_sim  # the smallest p a window can show is 1 / (n_sim + 1)
    return out


def scatter_stderr(values: np.ndarray) -> float:
    """Per-point noise of a series from its own jitter (see :func:`analysis.significance.scatter_stderr`)."""
    return sig.scatter_stderr(values)


def window_sentences(windows: pd.DataFrame, score: str, x_label: str = "step") -> list[str]:
    """One plain sentence per window: where, how much with its interval, and how sure."""
    level = 1 - 2 * windows.attrs.get("alpha", 0.05)
    # At the simulation's floor the p-value is a bound: no simulated run came close.
    floor = 1.0 / (1 + windows.attrs["n_sim"]) if "n_sim" in windows.attrs else 0.0
    out = []
    for w in windows.itertuples():
        what = "flat loss" if w.kind == "grokking" else "improving loss"
        p = f"<= {w.p_adjusted:.2g}" if w.p_adjusted <= floor * (1 + 1e-9) else f"= {w.p_adjusted:.2g}"
        out.append(
            f"{w.run}, {x_label} {w.start:g} to {w.end:g} ({what}): {score} {w.downstream_change:+.3g} "
            f"({level:.0%} simultaneous interval {w.change_lo:+.3g} to {w.change_hi:+.3g}), "
            f"adjusted p {p}, {w.stderr_source} stderrs"
        )
    return out


_TOL_OF_WORDS = {"value": "of its value", "range": "of its range over the run", "absolute": "(absolute)"}


def flat_words(tol: float, tol_of: str = "value") -> str:
    """What "flat" means, in words: "2% of its range over the run", "0.05 (absolute)"."""
    return f"{tol:g} {_TOL_OF_WORDS[tol_of]}" if tol_of == "absolute" else f"{tol:.0%} {_TOL_OF_WORDS[tol_of]}"


def windows_caption(windows: pd.DataFrame, score: str, tol: float, alpha: float, tol_of: str = "value") -> str:
    """One sentence that says what the windows table claims and at which error rate."""
    within = flat_words(tol, tol_of)
    rule = (
        f"Grokking: the loss stays flat within {within} while {score} improves; inverse: the loss improves while "
        f"{score} gets worse. Every span of checkpoints is tested, and a run with no real move gets any window "
        f"at all with probability {alpha:g} (p_adjusted is family-wise over the run's n_spans spans; "
        f"change_lo..change_hi is a {1 - 2 * alpha:.0%} simultaneous interval)."
    )
    if not len(windows):
        return f"No window at α = {alpha:g}. {rule}"
    return rule
