"""Learning-rate schedule phases: warmup, stable and decay, from a logged learning rate.

A divergence window that falls in a decay phase deserves a second look: loss and downstream scores both
move fast while the learning rate anneals (warmup-stable-decay runs drop their loss mostly there), so a
window there may be the schedule's doing rather than a change in what the model learns.

The rule, on the learning rate divided by its peak (after a running median, so a noisy log does not
split a phase):

- ``warmup``: from the first logged step until the rate first comes within ``tol`` of its peak, when it
  starts below that;
- ``decay``: from the last step the rate is within ``tol`` of its peak to the end, when it ends more than
  ``tol`` below it (a constant schedule has none);
- ``stable``: between the two. A plateau shorter than ``min_stable`` times the decay that follows is the
  rounded top of a cosine or linear decay, not a stable phase: it is counted as decay.

The learning rate is found under ``train/learning_rate`` (what ``runs.logs`` names ``lr`` and
``learning_rate``) or any logged metric whose last name part is ``lr``, ``learning_rate`` or ``lr-<group>``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

PHASES = ("warmup", "stable", "decay")
PHASE_COLUMNS = ["phase", "start_step", "end_step", "lr_start", "lr_end"]
RUN_PHASE_COLUMNS = ["run", "metric", "phase", "start", "end", "start_step", "end_step", "lr_start", "lr_end"]
PREFERRED_LR = "train/learning_rate"


def _empty(columns: list[str]) -> pd.DataFrame:
    text = {"run", "metric", "phase"}
    return pd.DataFrame({c: pd.Series(dtype=object if c in text else float) for c in columns})


def _running_median(values: np.ndarray, width: int) -> np.ndarray:
    """Centred running median over ``width`` points (odd), shrinking at the ends instead of padding."""
    if width <= 1:
        return values.copy()
    return pd.Series(values).rolling(width, center=True, min_periods=1).median().to_numpy()


def schedule_phases(
    steps: Sequence[float] | np.ndarray | pd.Series,
    lr: Sequence[float] | np.ndarray | pd.Series,
    *,
    tol: float = 0.05,
    min_stable: float = 0.25,
) -> pd.DataFrame:
    """The warmup / stable / decay phases of one run's learning-rate log (module docstring for the rule).

    ``steps`` and ``lr`` are paired values in any order; non-finite pairs are dropped and a step logged
    twice keeps the mean of its values. Returns one row per phase found, in order: phase, start_step,
    end_step, lr_start, lr_end (the logged rate at the ends). Fewer than 3 steps, or a rate that is
    zero throughout, give no phases (nothing to tell). Raises ValueError for unequal lengths, a negative
    rate, or ``tol`` / ``min_stable`` out of range.
    """
    if not 0.0 < tol < 1.0:
        raise ValueError(f"tol={tol}: use a fraction of the peak learning rate between 0 and 1, e.g. 0.05")
    if min_stable < 0:
        raise ValueError(f"min_stable={min_stable}: use a ratio >= 0 (0 keeps every plateau)")
    try:
        s = np.asarray(steps, dtype=float).ravel()
        v = np.asarray(lr, dtype=float).ravel()
    except (TypeError, ValueError) as err:
        raise ValueError(f"learning-rate log is not numeric ({err}); pass steps and rates as numbers") from None
    if len(s) != len(v):
        raise ValueError(f"{len(s)} steps but {len(v)} learning rates: pass one rate per logged step")
    keep = np.isfinite(s) & np.isfinite(v)
    s, v = s[keep], v[keep]
    if (v < 0).any():
        raise ValueError(f"negative learning rate {v.min():g} at step {s[np.argmin(v)]:g}: is this the rate?")
    frame = pd.DataFrame({"step": s, "lr": v}).groupby("step", sort=True, as_index=False)["lr"].mean()
    if len(frame) < 3 or not (frame["lr"] > 0).any():
        return _empty(PHASE_COLUMNS)
    s, v = frame["step"].to_numpy(), frame["lr"].to_numpy()
    # A median over ~2% of the log (odd width, at least 1) keeps a step change sharp but ignores spikes.
    width = max(1, int(len(v) * 0.02) // 2 * 2 + 1)
    smooth = _running_median(v, width)
    ratio = smooth / smooth.max()
    near_peak = np.flatnonzero(ratio >= 1.0 - tol)
    first_peak, last_peak = int(near_peak[0]), int(near_peak[-1])
    last = len(s) - 1
    bounds: list[tuple[str, int, int]] = []
    if first_peak > 0:
        bounds.append(("warmup", 0, first_peak))
    decay_from = last_peak if last_peak < last else None
    if decay_from is not None:
        plateau = s[last_peak] - s[first_peak]
        if plateau < min_stable * (s[last] - s[last_peak]):
            decay_from = first_peak  # the rounded top of a cosine, not a stable phase
        elif plateau > 0:
            bounds.append(("stable", first_peak, last_peak))
        bounds.append(("decay", decay_from, last))
    elif first_peak < last:
        bounds.append(("stable", first_peak, last))
    rows = [(name, s[i], s[j], v[i], v[j]) for name, i, j in bounds]
    return pd.DataFrame(rows, columns=PHASE_COLUMNS) if rows else _empty(PHASE_COLUMNS)


def lr_metric(names: Sequence[str]) -> str | None:
    """The logged learning-rate metric among ``names``: ``train/learning_rate`` first, else the first match."""
    names = [str(n) for n in names]
    if PREFERRED_LR in names:
        return PREFERRED_LR
    for name in sorted(names):
        last = name.rsplit("/", 1)[-1].lower()
        if last in ("lr", "learning_rate", "learning-rate") or last.startswith("lr-"):
            return name
    return None


def run_phases(frame: pd.DataFrame, x: str = "step", **options: float) -> pd.DataFrame:
    """Schedule phases of every run in a long table (run, step, metric, value[, tokens, flops]) on axis ``x``.

    Each run's learning rate is found by :func:`lr_metric` and split by :func:`schedule_phases`
    (``options``: tol, min_stable). ``start``/``end`` are the phase ends on ``x`` (``step``, ``tokens``
    or ``flops``), read off the rate's own rows; a run without a rate, or without ``x`` values at its
    rate's rows, has no phases. Columns: run, metric, phase, start, end, start_step, end_step, lr_start, lr_end.
    """
    if not isinstance(frame, pd.DataFrame) or not {"run", "step", "metric", "value"} <= set(frame.columns):
        raise ValueError("run_phases needs the long table (run, step, metric, value[, tokens])")
    if x not in ("step", "tokens", "flops"):
        raise ValueError(f"x-axis {x!r}: choose step, tokens or flops")
    pieces = []
    for run, rows in frame.groupby("run", sort=True):
        metric = lr_metric(rows["metric"].unique())
        if metric is None:
            continue
        lr_rows = rows[rows["metric"] == metric]
        phases = schedule_phases(lr_rows["step"], lr_rows["value"], **options)
        if not len(phases):
            continue
        if x == "step":
            start, end = phases["start_step"], phases["end_step"]
        else:
            if x not in lr_rows:
                continue
            known = lr_rows[["step", x]].apply(pd.to_numeric, errors="coerce").dropna().sort_values("step")
            if len(known) < 2:
                continue
            # x grows with the step: interpolate, never extrapolate (a phase end outside is clipped).
            start = np.interp(phases["start_step"], known["step"], known[x])
            end = np.interp(phases["end_step"], known["step"], known[x])
        pieces.append(phases.assign(run=str(run), metric=metric, start=np.asarray(start), end=np.asarray(end)))
    if not pieces:
        return _empty(RUN_PHASE_COLUMNS)
    return pd.concat(pieces, ignore_index=True)[RUN_PHASE_COLUMNS]


def decay_notes(windows: pd.DataFrame, phases: pd.DataFrame) -> list[str]:
    """Per window (run, start, end on the phases' x-axis), a note when it overlaps its run's decay, else "".

    The note names the overlap, e.g. "overlaps the lr decay (400 to 500)".
    """
    notes = []
    decays = phases[phases["phase"] == "decay"] if len(phases) else phases
    for w in windows.itertuples(index=False):
        lo, hi = sorted((float(w.start), float(w.end)))
        note = ""
        for d in decays[decays["run"] == str(w.run)].itertuples(index=False):
            if lo < float(d.end) and float(d.start) < hi:
                note = f"overlaps the lr decay ({max(lo, float(d.start)):g} to {min(hi, float(d.end)):g})"
                break
        notes.append(note)
    return notes


def decay_sentence(notes: Sequence[str]) -> str:
    """One sentence for the windows list: how many windows overlap a decay and why that matters; "" if none."""
    n = sum(1 for note in notes if note)
    if not n:
        return ""
    which = "One window overlaps" if n == 1 else f"{n} windows overlap"
    return (
        f"{which} a learning-rate decay (lr_schedule column): loss and scores move fast while the rate anneals, "
        "so check that the move is not the schedule's doing before reading it as a divergence."
    )
