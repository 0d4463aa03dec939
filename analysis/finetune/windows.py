"""Catastrophic-overtraining windows: spans where the pre-fine-tuning score rises while the post one falls.

Every span i..j of a run's checkpoints (at least ``min_points``) whose *pre*-fine-tuning score improves by
more than ``pre_z`` combined stderrs is a candidate ("the base model got better here"). Each candidate is
tested for a *fall* of the post-fine-tuning score over the same span with
:func:`analysis.significance.span_test`: its statistic is the post score's worsening over the combined
stderr of its endpoints, and the null distribution of the largest statistic over all the run's candidates is
simulated from the measured stderrs (max-T), so a run whose post score does not move gets any window with
probability ``alpha``, whatever its number of checkpoints. The candidates are picked from the pre scores
only, which carry no information about the post scores' noise under the null, so picking them does not
bias the test. The error rate is that of the post score's fall; the pre score's rise is a condition (by
default more than 1 combined stderr), not a tested claim: with a flat, noisy pre score some spans still
qualify, so read a window's ``pre_change`` beside its p-value. "Improves" and "falls" follow the score's
direction (``analysis.directions``). Windows are reported one per move
(:func:`analysis.significance.report_spans`) with the change, its simultaneous interval and the adjusted
p-value. Checked by null and planted-signal simulations in
tests/test_finetune_windows.py.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis import significance as sig
from analysis.directions import orientation
from analysis.finetune import FINETUNE

COLUMNS = [
    "run", "start", "end", "pre_change", "post_change", "change_lo", "change_hi", "p_adjusted", "z_score",
    "n_points", "n_spans", "stderr_source",
]  # fmt: skip


def overtraining_spans(
    pre: np.ndarray,
    pre_se: np.ndarray,
    post: np.ndarray,
    post_se: np.ndarray,
    *,
    higher_is_better: bool = True,
    pre_z: float = 1.0,
    min_points: int = 2,
    alpha: float = 0.05,
    n_sim: int = 2000,
    seed: int = 0,
) -> tuple[list[dict], str]:
    """The windows of one run (index spans into the arrays) and the stderr source of the test.

    ``pre_se`` NaN: the pre score's noise is estimated from its own scatter; ``post_se`` NaN: studentized
    in the test, as span_test does.
    """
    pre, post = np.asarray(pre, dtype=float), np.asarray(post, dtype=float)
    pre_se = np.abs(np.asarray(pre_se, dtype=float))
    sign = 1.0 if higher_is_better else -1.0
    n = len(pre)
    pre_se = np.where(np.isfinite(pre_se), pre_se, sig.scatter_stderr(pre))
    i, j = np.triu_indices(n, k=min_points - 1)
    rise = sign * (pre[j] - pre[i])
    candidate = rise > pre_z * np.sqrt(pre_se[i] ** 2 + pre_se[j] ** 2)
    start, end = i[candidate], j[candidate]
    test = sig.span_test(post, post_se, start, end, np.full(len(start), -sign), alpha=alpha, n_sim=n_sim, seed=seed)
    if test is None:
        return [], "none"
    out = []
    for k in sig.report_spans(test.start, test.end, test.p_adjusted <= alpha, test.stat):
        a, b = int(test.start[k]), int(test.end[k])
        out.append(
            {
                "start": a,
                "end": b,
                "pre_change": float(pre[b] - pre[a]),
                "post_change": float(test.change[k]),
                "change_lo": float(test.change_lo[k]),
                "change_hi": float(test.change_hi[k]),
                "p_adjusted": float(test.p_adjusted[k]),
                "z_score": float(test.stat[k]),
                "n_points": b - a + 1,
                "n_spans": len(start),
            }
        )
    return out, test.stderr_source


def finetune_tasks(names: list[str]) -> list[str]:
    """The tasks with fine-tune results among stored metric names (``finetune/<task>/post``)."""
    return sorted({n.split("/")[1] for n in names if n.startswith(f"{FINETUNE}/") and n.endswith("/post")})


def overtraining_windows(
    frame: pd.DataFrame,
    task: str,
    *,
    x: str = "step",
    alpha: float = 0.05,
    pre_z: float = 1.0,
    min_points: int = 2,
    n_sim: int = 2000,
    seed: int = 0,
) -> pd.DataFrame:
    """Catastrophic-overtraining windows of every run in ``frame`` (a long table) for one fine-tune ``task``.

    Columns: run, start, end (x units), pre_change and post_change (end - start, raw units), change_lo /
    change_hi (simultaneous bounds on the post change, together a (1 - 2 alpha) interval), p_adjusted
    (family-wise over the run's n_spans candidates), z_score, n_points, n_spans, stderr_source.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha={alpha} must be between 0 and 1")
    if min_points < 2:
        raise ValueError(f"min_points={min_points}: a window needs at least 2 points")
    pre_m, post_m = f"{FINETUNE}/{task}/pre", f"{FINETUNE}/{task}/post"
    higher = orientation(post_m, frame) > 0
    rows = []
    for run, group in frame[frame["metric"].isin([pre_m, post_m])].groupby("run", sort=True):
        wide = group.pivot_table(index=x, columns="metric", values=["value", "stderr"], aggfunc="first", dropna=False)
        if ("value", pre_m) not in wide or ("value", post_m) not in wide:
            continue
        wide = wide[wide[("value", pre_m)].notna() & wide[("value", post_m)].notna()].sort_index()
        if len(wide) < min_points:
            continue

        def col(kind: str, metric: str, wide: pd.DataFrame = wide) -> np.ndarray:
            return wide[(kind, metric)].to_numpy(dtype=float) if (kind, metric) in wide else np.full(len(wide), np.nan)

        found, source = overtraining_spans(
            col("value", pre_m), col("stderr", pre_m), col("value", post_m), col("stderr", post_m),
            higher_is_better=higher, pre_z=pre_z, min_points=min_points, alpha=alpha, n_sim=n_sim, seed=seed,
        )  # fmt: skip
        xs = wide.index.to_numpy(dtype=float)
        for w in found:
            rows.append({"run": run, **w, "start": xs[w["start"]], "end": xs[w["end"]], "stderr_source": source})
    out = pd.DataFrame(rows, columns=COLUMNS)
    out.attrs["alpha"] = alpha
    return out
