"""Every downstream score at a glance: one panel per task or task group, sorted by how much it moved.

``overview(frame)`` takes the long table (one setting per metric, ``analysis.settings.select_settings``)
and returns the panels to draw as small multiples (``analysis.charts.small_multiples_figure``):

- one panel per lm-eval task, showing its primary metric (``acc``, then ``acc_norm``, ``exact_match``, ...;
  the task's other metrics stay in the data); a logged accuracy (``eval/accuracy``) is a panel of its own;
- a task group (MMLU's subjects, ``hendrycksTest-*`` or ``mmlu_*``) is one panel: the group's stored row
  where the cache has one (marked derived when the importer computed it, ``analysis.evals.lmeval.group_means``),
  else the unweighted mean of the subjects present at every checkpoint, computed here and marked derived;
- panels are sorted by how much they moved: the largest change from a run's first to its last checkpoint,
  oriented so that an improvement is positive, in units of that change's stderr (the measured stderrs; a
  series without stderrs gets its own checkpoint-to-checkpoint scatter). This is an ordering, not a test:
  nothing here is called significant.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from analysis import divergence as dv
from analysis.directions import orientation

# A task's primary metric: the first of these it has (filters: "none" first), else its first metric by name.
PRIMARY = ("acc", "acc_norm", "exact_match", "em", "f1", "mc2", "mc1", "pct_stereotype", "likelihood_difference")
PANEL_COLUMNS = [
    "panel", "metric", "derived", "members", "n_members", "runs", "first", "last", "change", "change_stderr", "moved",
]  # fmt: skip
MEMBER_COLUMNS = ["task", "panel", "metric", "run", "first", "last", "change", "change_stderr", "moved"]


@dataclass(frozen=True)
class Overview:
    """The panels (one row each, most moved first), every task's own change, and the series to draw."""

    panels: pd.DataFrame  # PANEL_COLUMNS
    members: pd.DataFrame  # MEMBER_COLUMNS: every task (group subjects included) and how much it moved
    series: pd.DataFrame  # panel, run, step, tokens, flops, value, stderr: what each panel draws

    @property
    def tasks(self) -> list[str]:
        """Every task the overview covers, a group's subjects included."""
        return sorted(set(self.members["task"]))


def _task(metric: str) -> str:
    return metric.split("/", 1)[0] if "," in metric and "/" in metric else metric


def _metric_key(metric: str) -> tuple[int, int, str]:
    """Sort key of a task's metrics: the primary metric first, filter "none" before the others."""
    name, _, flt = metric.rsplit("/", 1)[-1].partition(",")
    rank = PRIMARY.index(name) if name in PRIMARY else len(PRIMARY)
    return (rank, flt != "none", metric)


def _group_of(task: str) -> str | None:
    """The group a task belongs to (``mmlu`` for ``hendrycksTest-anatomy`` or ``mmlu_anatomy``), else None."""
    if "-" not in task and "_" not in task:
        return None
    from analysis.evals.lmeval import GROUPS  # lm-eval's bridge imports torch: only when a name could match

    for group, families in GROUPS.items():
        for prefix, subjects in families:
            if task.startswith(prefix) and task[len(prefix) :] in subjects:
                return group
    return None


def _derived_note(rows: pd.DataFrame) -> str:
    """The importer's note on a derived group row ("mean of 57 hendrycksTest-* subjects"), '' if stored as is."""
    for params in rows["params"].dropna().unique() if "params" in rows else []:
        try:
            note = json.loads(params).get("derived")
        except (TypeError, ValueError, AttributeError):
            continue
        if note:
            return str(note)
    return ""


def _moved(rows: pd.DataFrame, sign: float) -> tuple[float, float, float, float, float]:
    """(first, last, oriented change, its stderr, change / stderr) of one run's series, ordered by step."""
    rows = rows.dropna(subset=["value"]).sort_values("step")
    if len(rows) < 2:
        return (math.nan,) * 5
    first, last = rows.iloc[0], rows.iloc[-1]
    change = sign * (float(last["value"]) - float(first["value"]))
    se = pd.to_numeric(pd.Series([first["stderr"], last["stderr"]]), errors="coerce")
    if se.notna().all() and float(se.pow(2).sum()) > 0:
        change_se = float(np.sqrt(se.pow(2).sum()))
    else:
        change_se = math.sqrt(2) * dv.scatter_stderr(rows["value"].to_numpy(dtype=float))
    # No stderr and no scatter (a logged series that only jumps): the change cannot be put in stderrs.
    moved = abs(change) / change_se if change_se > 0 else math.nan
    return float(first["value"]), float(last["value"]), change, change_se, moved


def _summary(series: pd.DataFrame, metric: str, frame: pd.DataFrame) -> dict:
    """The run that moved most: its first, last, change, change stderr and moved."""
    sign = orientation(metric, frame)
    best = None
    for _, rows in series.groupby("run", sort=True):
        values = _moved(rows, sign)
        # Most moved in stderrs; a run whose change has no stderr counts below any that has one.
        key = (not math.isnan(values[4]), values[4] if not math.isnan(values[4]) else abs(values[2]))
        if not math.isnan(values[2]) and (best is None or key > best[0]):
            best = (key, values)
    keys = ("first", "last", "change", "change_stderr", "moved")
    return dict(zip(keys, best[1] if best else (math.nan,) * 5, strict=True))


def _mean_of(rows: pd.DataFrame, members: list[str]) -> pd.DataFrame:
    """The unweighted mean over ``members`` at each (run, step) where every member has a value."""
    rows = rows.dropna(subset=["value"])
    grouped = rows.groupby(["run", "step"], as_index=False).agg(
        tokens=("tokens", "min"), flops=("flops", "min"), value=("value", "mean"), n=("value", "size"),
        sq=("stderr", lambda s: (s**2).sum()), se_n=("stderr", "count"),
    )  # fmt: skip
    grouped = grouped[grouped["n"] == len(members)]
    k = float(len(members))
    stderr = np.where(grouped["se_n"] == len(members), np.sqrt(grouped["sq"]) / k, np.nan)
    return grouped.assign(stderr=stderr)[["run", "step", "tokens", "flops", "value", "stderr"]]


def overview(frame: pd.DataFrame) -> Overview:
    """Panels of every downstream score in ``frame`` (see the module docstring)."""
    empty = Overview(
        pd.DataFrame(columns=PANEL_COLUMNS),
        pd.DataFrame(columns=MEMBER_COLUMNS),
        pd.DataFrame(columns=["panel", "run", "step", "tokens", "flops", "value", "stderr"]),
    )
    if not len(frame):
        return empty
    scores = dv.downstream_metrics(sorted(frame["metric"].unique()))
    by_task: dict[str, list[str]] = {}
    for metric in scores:
        by_task.setdefault(_task(metric), []).append(metric)
    groups: dict[str, list[str]] = {}
    for task in by_task:
        if (group := _group_of(task)) is not None:
            groups.setdefault(group, []).append(task)
    # flops: NaN unless the frame carries it (pages on the FLOPs x-axis: analysis.flops.add_flops_column).
    columns = ["run", "step", "tokens", "flops", "value", "stderr", "params"]
    data = frame.reindex(columns=["metric", *columns])
    numeric = ("step", "tokens", "flops", "value", "stderr")
    data = data.assign(**{c: pd.to_numeric(data[c], errors="coerce") for c in numeric})

    panels, members, series = [], [], []

    def add_panel(name: str, metric: str, rows: pd.DataFrame, derived: str, tasks: list[str]) -> None:
        summary = _summary(rows, metric, frame)
        panels.append(
            {"panel": name, "metric": metric, "derived": derived, "members": ", ".join(tasks),
             "n_members": len(tasks), "runs": rows["run"].nunique(), **summary}
        )  # fmt: skip
        series.append(rows[["run", "step", "tokens", "flops", "value", "stderr"]].assign(panel=name))

    def add_members(panel: str, task_metrics: list[tuple[str, str]]) -> None:
        for task, metric in task_metrics:
            rows = data[data["metric"] == metric]
            sign = orientation(metric, frame)
            for run, mine in rows.groupby("run", sort=True):
                first, last, change, change_se, moved = _moved(mine, sign)
                members.append(
                    {"task": task, "panel": panel, "metric": metric, "run": run, "first": first, "last": last,
                     "change": change, "change_stderr": change_se, "moved": moved}
                )  # fmt: skip

    grouped = {t for tasks in groups.values() for t in tasks}
    for task, metrics in sorted(by_task.items()):
        if task in grouped or task in groups:
            continue  # a group's subjects and its own row make one panel, below
        metric = sorted(metrics, key=_metric_key)[0]
        rows = data[data["metric"] == metric]
        add_panel(metric, metric, rows, _derived_note(rows), [task])
        add_members(metric, [(task, metric)])
    for group, tasks in sorted(groups.items()):
        tasks = sorted(tasks)
        # The subjects' common metric: the primary one every subject has.
        shared = set.intersection(*[{m.split("/", 1)[1] for m in by_task[t]} for t in tasks])
        short = sorted(shared, key=_metric_key)[0] if shared else None
        if short is None:
            continue
        stored = f"{group}/{short}"
        member_metrics = [(t, f"{t}/{short}") for t in tasks]
        if stored in by_task.get(group, []):
            rows = data[data["metric"] == stored]
            derived = _derived_note(rows)
        else:
            rows = _mean_of(data[data["metric"].isin([m for _, m in member_metrics])], tasks)
            derived = f"mean of {len(tasks)} subjects, computed for this overview"
        add_panel(stored, stored, rows, derived, tasks)
        add_members(stored, member_metrics)
    if not panels:
        return empty
    table = pd.DataFrame(panels, columns=PANEL_COLUMNS)
    table = table.sort_values(["moved", "panel"], ascending=[False, True], na_position="last", ignore_index=True)
    order = {name: i for i, name in enumerate(table["panel"])}
    drawn = pd.concat(series, ignore_index=True)
    drawn = drawn.sort_values(["panel", "run", "step"], key=lambda c: c.map(order) if c.name == "panel" else c)
    member_table = pd.DataFrame(members, columns=MEMBER_COLUMNS).sort_values(
        ["panel", "moved"], ascending=[True, False], key=lambda c: c.map(order) if c.name == "panel" else c,
        ignore_index=True,
    )  # fmt: skip
    return Overview(table, member_table, drawn.reset_index(drop=True))


def moved_sentence(view: Overview, top: int = 3) -> str:
    """One sentence naming the panels that moved most and least (descriptive: an ordering, not a test)."""
    table = view.panels.dropna(subset=["moved"])
    if not len(table):
        return "No downstream score has two checkpoints to compare."

    def name(row) -> str:
        derived = " (derived)" if row.derived else ""
        return f"{row.panel}{derived} {row.change:+.3g} ({row.moved:.1f} stderrs)"

    most = "; ".join(name(r) for r in table.head(top).itertuples())
    least = "; ".join(name(r) for r in table.tail(min(top, max(len(table) - top, 0))).itertuples())
    n_tasks = len(set(view.members["task"]))
    text = (
        f"{n_tasks} downstream task(s) in {len(view.panels)} panel(s). Moved most from first to last checkpoint "
        f"(improvement positive, in stderrs of the change): {most}"
    )
    return text + (f". Least: {least}" if least else "")
