"""lm-eval result files on disk: one ``results_*.json`` (either schema) read into :class:`ImportedEvals`,
attributed to a checkpoint step, with the group means it lacks and the continuous metrics of its
``--log_samples`` files."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from analysis.evals.lmeval_groups import DerivedRow, group_means
from analysis.evals.lmeval_results import (
    EvalRow,
    dict_or_empty,
    finite_number,
    int_or_none,
    rows_from_results,
    samples_from_results,
)
from analysis.runs.base import MAX_STEP, check_not_lfs_pointer
from analysis.runs.stepnames import parse_step_name


@dataclass(frozen=True)
class ImportedEvals:
    """Scores read from one lm-eval results file, attributed to one checkpoint step."""

    path: Path
    step: int
    step_source: str  # "model_args revision", "model_revision", "path" or "argument"
    model_args: str | None
    rows: tuple[EvalRow, ...]
    problems: tuple[str, ...] = ()
    date: float | None = None  # lm-eval 0.4's own ``date`` (unix time the run started); None in 0.3 files
    derived: tuple[DerivedRow, ...] = ()  # group means the file lacks (see ``group_means``)


def step_from_text(text: str) -> int | None:
    """The training step named in a revision or path component, or None.

    "step83000", "stage1-step1000-tokens4B", "global_step500", "checkpoint-1000", "iter_0001000", "300": the
    grammar that names checkpoint folders (``analysis.runs.stepnames``), so a result file and its checkpoint agree.
    """
    parsed = parse_step_name(text)
    return None if parsed is None else parsed[0]


def _revision(model_args: Any) -> str | None:
    if isinstance(model_args, dict):
        rev = model_args.get("revision")
        return None if rev is None else str(rev)
    if isinstance(model_args, str):
        for part in model_args.split(","):
            key, _, value = part.partition("=")
            if key.strip() == "revision":
                return value.strip()
    return None


def _read_results_json(path: Path) -> dict[str, Any]:
    """The JSON object of an lm-eval results file; ValueError naming the file and the fix for anything else."""
    if not path.is_file():
        raise ValueError(f"{path}: file not found; pass an lm-eval results JSON (results_*.json)")
    check_not_lfs_pointer(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{path}: not valid JSON (line {err.lineno} column {err.colno}: {err.msg}); "
            "pass a results file written by lm-eval"
        ) from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text; pass a results JSON written by lm-eval") from None
    except RecursionError:
        raise ValueError(f"{path}: JSON nested too deeply for lm-eval results; pass an lm-eval results file") from None
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
        raise ValueError(
            f"{path}: no 'results' object; an lm-eval results file has {{\"results\": {{task: {{metric: value}}}}}}"
        )
    return data


def _step_of(path: Path, config: dict[str, Any], step: int | None) -> tuple[int, str]:
    """``(step, where it came from)``: the revision in ``config``, else the path, else ``step``; else ValueError."""
    found: tuple[int, str] | None = None
    rev = _revision(config.get("model_args"))
    model_revision = config.get("model_revision")
    if rev is not None and (at := step_from_text(rev)) is not None:
        found = (at, "model_args revision")
    elif isinstance(model_revision, str) and (at := step_from_text(model_revision)) is not None:
        found = (at, "model_revision")
    else:
        # The file name first, then its folders from the nearest up.
        for part in [path.stem, *reversed(path.resolve().parent.parts)]:
            if (s := step_from_text(part)) is not None:
                found = (s, "path")
                break
    if found is None and step is not None:
        found = (int(step), "argument")
    if found is None:
        raise ValueError(
            f"{path}: cannot tell the checkpoint step (no revision=stepN in config.model_args, no stepN in the path); "
            "pass the step explicitly"
        )
    if not 0 <= found[0] <= MAX_STEP:
        raise ValueError(f"{path}: step {found[0]} (from the {found[1]}) is not in 0..2**53; pass the real step")
    return found


def parse_results_file(path: str | Path, step: int | None = None) -> ImportedEvals:
    """Read an lm-eval results JSON (current or 0.3 schema) and attribute it to a checkpoint step.

    The step comes from ``revision=...stepN`` in ``config.model_args`` (or
    ``config.model_revision``), else from the path (``results_step1000.json``,
    ``step_1000/results.json``, ``checkpoint-1000/``), else from ``step``; otherwise ValueError.
    Non-numeric and NaN values are skipped and listed in ``problems``.
    """
    path = Path(path)
    data = _read_results_json(path)
    config = dict_or_empty(data.get("config"))
    model_args = config.get("model_args")
    found = _step_of(path, config, step)
    legacy_shot = int_or_none(config.get("num_fewshot"))
    rows, problems = rows_from_results(data, source=str(path), n_shot_default=legacy_shot)
    if not rows:
        raise ValueError(f"{path}: no numeric metric values under 'results'; nothing to import")
    if isinstance(model_args, dict):
        model_args = ",".join(f"{k}={v}" for k, v in model_args.items())
    groups = dict_or_empty(data.get("groups"))
    derived, notes = group_means(rows, present=set(groups))
    continuous, sample_notes = continuous_from_sample_files(path, data, rows)
    rows += continuous
    notes = [*notes, *sample_notes]
    return ImportedEvals(
        path=path,
        step=found[0],
        step_source=found[1],
        model_args=None if model_args is None else str(model_args),
        rows=tuple(rows),
        problems=tuple(problems) + tuple(f"{path}: {note}" for note in notes),
        date=finite_number(data.get("date")),
        derived=tuple(derived),
    )


def continuous_from_sample_files(
    path: Path, data: dict[str, Any], rows: list[EvalRow]
) -> tuple[list[EvalRow], list[str]]:
    """The continuous counterparts of a results file's multiple-choice scores, from its ``--log_samples`` files.

    lm-eval 0.4 writes ``samples_<task>_<time>.jsonl`` beside ``results_<time>.json``, one line per document
    with its per-choice log-likelihoods (``filtered_resps``); each task that has such a file gets the rows of
    :mod:`analysis.evals.continuous` (without ``nll_per_token``: no tokenizer at import). Returns (rows,
    notes about unreadable sample files).
    """
    from analysis.evals.continuous import continuous_metrics

    name = path.name
    if not (name.startswith("results_") and name.endswith(".json")):
        return [], []
    stamp = name[len("results_") : -len(".json")]
    configs = dict_or_empty(data.get("configs"))
    shots = {r.task: (r.n_shot, r.task_version) for r in rows}
    out, notes = [], []
    for task in sorted(t for t in shots if isinstance(configs.get(t), dict)):
        sample_file = path.parent / f"samples_{task}_{stamp}.jsonl"
        if not sample_file.is_file():
            continue
        try:
            items = [json.loads(line) for line in sample_file.read_text(encoding="utf-8").splitlines() if line.strip()]
            records = samples_from_results({"configs": {task: configs[task]}, "samples": {task: items}})
        except (OSError, ValueError, KeyError, TypeError, IndexError) as err:
            notes.append(f"{sample_file}: per-sample records unreadable ({type(err).__name__}); no continuous metrics")
            continue
        n_shot, version = shots[task]
        for c in continuous_metrics(records):
            out.append(EvalRow(task=task, metric=f"{c.name},none", value=c.value, stderr=c.stderr, n=c.n,
                               n_shot=n_shot, task_version=version))  # fmt: skip
    return out, notes
