"""Importing lm-eval result files into a run: the rows to store, and one value per (step, metric, setting).

Published sweeps sometimes hold two files for one checkpoint (Pythia's 70m zero-shot sweep has two for
step 123000). Stored as they are, they would be two values of one series under two parameter hashes
(the file path is part of the stored parameters), and every reader would have to pick one. So the
import keeps one, by a rule the user sees: the **latest file** by its own date (lm-eval 0.4 writes
``date``, the unix time its run started), else by the file's modification time, then by the later
file name; one warning line per step names the file kept, the file dropped and why.

A "setting" is what ``analysis.settings.setting_params`` makes of a row's parameters: the file path
and the checkpoint named in ``model_args`` do not count, the shot count and the other model
arguments do. Two files for one step under different settings (0-shot and 5-shot) are both kept.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime

from analysis.evals.lmeval import EvalRow, ImportedEvals
from analysis.runs.base import Checkpoint
from analysis.settings import setting_params
from analysis.store import ResultRow, library_versions


@dataclass
class ImportPlan:
    """What an import writes: result rows, checkpoints to register, and lines to show the user."""

    rows: list[ResultRow] = field(default_factory=list)
    new_checkpoints: list[tuple[str, Checkpoint]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # one line each, without the "warning: " prefix


@dataclass(frozen=True)
class _FileTime:
    """When a result file was written, by the best evidence it has, for "the latest file wins"."""

    seconds: float
    how: str  # "lm-eval date" or "modified"
    name: str

    @property
    def key(self) -> tuple[float, str]:
        return self.seconds, self.name

    def describe(self) -> str:
        stamp = datetime.fromtimestamp(self.seconds, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        return f"{self.how} {stamp}"


def file_time(imported: ImportedEvals) -> _FileTime:
    """The file's lm-eval ``date`` when it has one, else its modification time (0 when unreadable)."""
    if imported.date is not None:
        return _FileTime(imported.date, "lm-eval date", str(imported.path))
    try:
        seconds = os.stat(imported.path).st_mtime
    except OSError:
        seconds = 0.0
    return _FileTime(seconds, "modified", str(imported.path))


def _why(kept: _FileTime, dropped: _FileTime) -> str:
    if kept.seconds == dropped.seconds:
        return "same time, later file name"
    if kept.how == dropped.how:
        return f"newer {'lm-eval date' if kept.how == 'lm-eval date' else 'modification time'}"
    return "newer (lm-eval date where a file has one, else modification time)"


def _result_row(run: str, step: int, fp: str, row: EvalRow, params: dict) -> ResultRow:
    return ResultRow(
        run, step, f"{row.task}/{row.metric}", row.value, fp, row.stderr, row.n,
        {**params, "num_fewshot": row.n_shot}, f"{row.task_version or ''};n_shot={row.n_shot}", library_versions(),
        higher_is_better=row.higher_is_better,
    )  # fmt: skip


def plan_import(imported: list[ImportedEvals], run: str, fingerprints: dict[int, str]) -> ImportPlan:
    """The rows to write for parsed result files, one value per (step, metric, setting).

    ``fingerprints``: step -> fingerprint of the run's registered checkpoints. A step with none
    gets a remote checkpoint (path ``imported:<file>``, fingerprint ``imported:<model_args>``).
    Group means the files lack (``lmeval.group_means``) are added with ``derived`` and ``subjects``
    in their parameters. Where two files give one (step, metric, setting), the latest file's value
    is kept (see the module docstring) and one warning per step says which.
    """
    plan = ImportPlan()
    by_step = dict(fingerprints)
    files = sorted(imported, key=lambda f: file_time(f).key)  # oldest first: a later file replaces
    times = [file_time(f) for f in files]
    chosen: dict[tuple[int, str, str], tuple[ResultRow, int]] = {}  # key -> (row, index of its file)
    lost: dict[int, dict[int, int]] = {}  # step -> file index -> values it lost to a later file
    won: dict[int, set[int]] = {}  # step -> indices of the files that replaced another's values
    for index, f in enumerate(files):
        if f.step not in by_step:
            fingerprint = f"imported:{f.model_args}"
            plan.new_checkpoints.append((run, Checkpoint(f.step, f"imported:{f.path}", fingerprint=fingerprint)))
            by_step[f.step] = fingerprint
        # The shot count is part of a result's setting: 0-shot and 5-shot files stay two series.
        params = {"imported_from": str(f.path.resolve()), "model_args": f.model_args}
        rows = [_result_row(run, f.step, by_step[f.step], r, params) for r in f.rows]
        rows += [
            _result_row(run, f.step, by_step[f.step], d.row, {**params, "derived": d.note, "subjects": d.subjects})
            for d in f.derived
        ]
        for row in rows:
            key = (f.step, row.metric, json.dumps(setting_params(row.params), sort_keys=True, default=str))
            if key in chosen:
                older = chosen[key][1]
                lost.setdefault(f.step, {})[older] = lost.get(f.step, {}).get(older, 0) + 1
                won.setdefault(f.step, set()).add(index)
            chosen[key] = (row, index)
    plan.rows = [row for row, _ in chosen.values()]
    for step, losers in sorted(lost.items()):
        winners = sorted(won[step] - set(losers)) or sorted(won[step])
        kept = ", ".join(f"{times[i].name} ({times[i].describe()})" for i in winners)
        dropped = ", ".join(f"{n} values of {times[i].name} ({times[i].describe()})" for i, n in sorted(losers.items()))
        why = _why(times[winners[-1]], times[max(losers)])
        plan.warnings.append(
            f"step {step}: {len(set(losers) | set(winners))} result files score the same metrics; "
            f"kept {kept}; dropped {dropped}: the latest file wins ({why})"
        )
    return plan
