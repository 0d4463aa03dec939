"""Per-sample results of one evaluation across checkpoints: which items flipped from wrong to right, and when.

Input is the store's sample rows of one run and metric (columns step, params_hash, sample_id,
value, record). A sample is *right* at a checkpoint when its value is >= ``threshold`` (0.5:
accuracy and exact match are 0/1). From the right/wrong sequence over the checkpoints each
sample gets:

- ``learnt_at``: the first checkpoint from which it is right at every later checkpoint (NaN if
  it is wrong at the last one);
- ``flips``: how many times it changed between right and wrong;
- ``status``: ``learnt`` (wrong at first, right from ``learnt_at`` on, one flip), ``unstable``
  (right at the end after more than one flip), ``forgotten`` (right at some point, wrong at the
  end), ``always right``, ``never right``.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

STATUSES = ("learnt", "unstable", "forgotten", "always right", "never right")
SUMMARY_COLUMNS = ["sample_id", "status", "learnt_at", "flips", "first", "last", "prompt", "target", "response"]


def pick_params(rows: pd.DataFrame) -> pd.DataFrame:
    """The rows of one parameter set: the one measured at the most checkpoints (ties: the newest)."""
    if rows.empty:
        return rows
    counts = rows.groupby("params_hash", sort=False)["step"].nunique()
    return rows[rows["params_hash"] == counts.idxmax()]


def correctness(rows: pd.DataFrame, threshold: float = 0.5) -> pd.DataFrame:
    """Samples x checkpoints table of right (1.0) / wrong (0.0), NaN where a checkpoint lacks the sample.

    Rows are ordered by natural sample id, columns by step.
    """
    if rows.empty:
        raise ValueError("no per-sample rows; run an evaluation with per-sample logging (the default) first")
    rows = pick_params(rows)
    value = pd.to_numeric(rows["value"], errors="coerce")
    table = (
        rows.assign(right=np.where(value.isna(), np.nan, (value >= threshold).astype(float)))
        .pivot_table(index="sample_id", columns="step", values="right", aggfunc="last")
        .sort_index(axis=1)
    )
    order = sorted(table.index, key=lambda s: (0, int(s), "") if str(s).isdigit() else (1, 0, str(s)))
    return table.loc[order]


def flip_summary(rows: pd.DataFrame, threshold: float = 0.5) -> pd.DataFrame:
    """One row per sample: status, learnt_at, flips, first/last state, and its prompt, target and last response."""
    table = correctness(rows, threshold)
    steps = np.asarray(table.columns, dtype=float)
    right = table.to_numpy()
    out = []
    for sid, seq in zip(table.index, right, strict=True):
        known = ~np.isnan(seq)
        vals, at = seq[known] >= 0.5, steps[known]
        if not len(vals):
            continue
        flips = int(np.count_nonzero(vals[1:] != vals[:-1]))
        learnt_at = np.nan
        if vals[-1]:
            wrong = np.flatnonzero(~vals)
            learnt_at = float(at[wrong[-1] + 1]) if len(wrong) else float(at[0])
        if vals.all():
            status = "always right"
        elif not vals.any():
            status = "never right"
        elif not vals[-1]:
            status = "forgotten"
        elif flips == 1:
            status = "learnt"
        else:
            status = "unstable"
        out.append((sid, status, learnt_at, flips, bool(vals[0]), bool(vals[-1])))
    summary = pd.DataFrame(out, columns=SUMMARY_COLUMNS[:6])
    texts = _last_texts(pick_params(rows))
    summary = summary.merge(texts, on="sample_id", how="left")
    return summary[SUMMARY_COLUMNS]


def learnt_per_step(summary: pd.DataFrame, steps) -> pd.DataFrame:
    """How many samples were learnt for good at each checkpoint (status learnt or unstable), and cumulatively."""
    done = summary[summary["status"].isin(["learnt", "unstable"])]
    counts = done["learnt_at"].value_counts()
    frame = pd.DataFrame({"step": sorted(steps)})
    frame["learnt"] = frame["step"].map(counts).fillna(0).astype(int)
    frame["cumulative"] = frame["learnt"].cumsum()
    return frame


def _last_texts(rows: pd.DataFrame) -> pd.DataFrame:
    """Prompt, target and the response at the last checkpoint of each sample (records as JSON or dicts).

    For a multiple-choice item the target and response are the answer strings, not their indices.
    """
    last = rows.sort_values("step").groupby("sample_id", sort=False).tail(1)
    records = [_record(r) for r in last["record"]]
    return pd.DataFrame(
        {
            "sample_id": last["sample_id"].to_numpy(),
            "prompt": [str(r.get("prompt", "")) for r in records],
            "target": [answer_text(r.get("target", ""), choice_strings(r)) for r in records],
            "response": [answer_text(r.get("response", ""), choice_strings(r)) for r in records],
        }
    )


def _strings(value) -> list[str] | None:
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (str, int, float)) for v in value):
        return [str(v) for v in value]
    return None


def choice_strings(record: dict) -> list[str] | None:
    """The answer choices of a multiple-choice sample record, in order; None when it has none.

    Looked for where lm-eval's records keep them: our stored ``choices``; the ``arguments`` of each
    choice's log-likelihood request (``[[context, " choice"], ...]``, or the ``{"gen_args_0": {"arg_0": ...,
    "arg_1": ...}}`` form of ``--log_samples`` files); the ``doc``'s ``choices`` (a list, or ARC's
    ``{"text": [...], "label": [...]}``).
    """
    found = _strings(record.get("choices"))
    if found:
        return found
    args = record.get("arguments")
    if isinstance(args, dict):
        # gen_args_10 comes after gen_args_9: order by the number in the key, not by its text.
        ordered = sorted(args.items(), key=lambda kv: int("".join(ch for ch in str(kv[0]) if ch.isdigit()) or 0))
        args = [list(a.values()) if isinstance(a, dict) else a for _, a in ordered]
    if isinstance(args, (list, tuple)) and len(args) > 1:
        seconds = [a[1] for a in args if isinstance(a, (list, tuple)) and len(a) == 2 and isinstance(a[1], str)]
        if len(seconds) == len(args):
            return seconds
    doc = record.get("doc")
    if isinstance(doc, dict):
        choices = doc.get("choices")
        if isinstance(choices, dict):
            choices = choices.get("text")
        return _strings(choices)
    return None


def answer_text(value, choices: list[str] | None) -> str:
    """``value`` (a target or response) as the user reads it: the choice string when it is a choice index.

    An index outside the choices, or a value that is already text, is shown as it is; a list of indices
    (several right answers) becomes its choice strings joined by `` | ``.
    """
    if value is None:
        return ""
    if not choices:
        return str(value)
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("[") and text.endswith("]"):
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                return value
        elif text.lstrip("-").isdigit():
            value = int(text)
        else:
            return value
    if isinstance(value, list):
        parts = [answer_text(v, choices) for v in value]
        return " | ".join(parts)
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and 0 <= value < len(choices):
        # Choices carry the space that joins them to the prompt (" 71"): show the answer itself.
        return choices[int(value)].strip() or choices[int(value)]
    return str(value)


def _record(value) -> dict:
    if isinstance(value, dict):
        return value
    try:
        parsed = json.loads(value) if isinstance(value, str) else {}
    except json.JSONDecodeError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def score_items(store, runs: list[str], score_metric: str, frame: pd.DataFrame) -> pd.DataFrame | None:
    """Per-item values behind a score, for the paired window test: run, step, sample_id, value.

    The items of an lm-eval score (``task/metric,filter``) are stored under the same name
    (``Store.sample_results``). Only the items of the setting ``frame`` holds for that score are kept (its
    ``params_hash``), so a 5-shot score is never paired with 0-shot items. None when no run has any.
    """
    rows = frame[frame["metric"].astype(str) == score_metric]
    if "params_hash" not in rows:
        return None
    pieces = []
    for run in runs:
        hashes = set(rows.loc[rows["run"].astype(str) == run, "params_hash"])
        items = store.sample_results(run, score_metric)
        items = items[items["params_hash"].isin(hashes)] if len(items) else items
        if len(items):
            pieces.append(items[["step", "sample_id", "value"]].assign(run=run))
    return pd.concat(pieces, ignore_index=True) if pieces else None
