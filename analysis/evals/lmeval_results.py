"""lm-eval's result schema read into rows: aggregated scores (:class:`EvalRow`) from a results dict of
either schema (0.3's ``acc`` / ``acc_stderr``, 0.4's ``acc,none``) and per-document records
(:class:`SampleRecord`) from its ``samples``.

Results are named as the store names them: ``<task>/<metric>,<filter>`` (``modarith_mc/acc,none``).
Older (0.3) files with plain ``acc`` / ``acc_stderr`` keys are read as ``acc,none``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

# Result keys that describe a task rather than measure it.
_META_KEYS = {"alias", "name", "sample_len", " ", "group", "task"}


@dataclass(frozen=True)
class EvalRow:
    """One aggregated score: ``value`` of ``metric`` ("acc,none") on ``task``."""

    task: str
    metric: str  # "<metric>,<filter>"
    value: float
    stderr: float | None  # None where lm-eval reported "N/A" (bootstrap off, or no estimator)
    n: int | None  # documents scored; None when the file does not say (0.3 schema)
    n_shot: int | None
    task_version: str | None
    higher_is_better: bool | None = None

    @property
    def name(self) -> str:
        """The store's metric name, ``<task>/<metric>,<filter>``."""
        return f"{self.task}/{self.metric}"


@dataclass(frozen=True)
class SampleRecord:
    """One document's value for one metric, with what the model answered.

    ``response``: the filtered generation for generate_until; the index of the highest
    log-likelihood choice for multiple_choice (``target`` is then the right index, as lm-eval
    logs it). ``choices`` / ``loglikelihoods``: per-choice continuations and their summed
    log-likelihoods for multiple_choice and loglikelihood tasks.
    """

    task: str
    doc_id: int
    metric: str  # "<metric>,<filter>"
    value: float | None  # None for per-sample values that are not numbers (corpus metrics)
    target: str
    prompt: str
    response: str | None = None
    choices: tuple[str, ...] | None = None
    loglikelihoods: tuple[float, ...] | None = None


def finite_number(value: Any) -> float | None:
    """A finite float, or None for anything else (strings, "N/A", bools, NaN, inf)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    try:
        value = float(value)
    except OverflowError:  # a JSON integer too big for a float
        return None
    return value if math.isfinite(value) else None


def int_or_none(value: Any) -> int | None:
    """:func:`finite_number` truncated to an int, or None."""
    value = finite_number(value)
    return None if value is None else int(value)


def _split_metric(key: str) -> tuple[str, str]:
    """("acc", "none") from "acc,none"; plain 0.3 keys ("acc") get the "none" filter."""
    metric, _, filt = key.partition(",")
    return metric, (filt or "none")


def _printable(text: str) -> str:
    """``text`` with control characters written as escapes (``\\n``, ``\\x00``), so it stays on one line."""
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


def dict_or_empty(value: Any) -> dict[str, Any]:
    """``value`` when it is an object, else an empty one (published files leave sections out, or null them)."""
    return value if isinstance(value, dict) else {}


def rows_from_results(results: dict[str, Any], *, source: str, n_shot_default: int | None = None):
    """Turn an lm-eval results dict (either schema) into EvalRows; return ``(rows, problems)``.

    Values that are not finite numbers are skipped with a note in ``problems``; a stderr of
    "N/A" (or missing, or not a number) becomes None.
    """
    n_shots = dict_or_empty(results.get("n-shot"))
    versions = dict_or_empty(results.get("versions"))
    n_samples = dict_or_empty(results.get("n-samples"))
    better = dict_or_empty(results.get("higher_is_better"))
    rows: list[EvalRow] = []
    problems: list[str] = []
    for task, metrics in results["results"].items():
        if not isinstance(metrics, dict):
            problems.append(f"{source}: results['{task}'] is not an object; skipped")
            continue
        version = versions.get(task)
        counts = n_samples.get(task)
        n = int_or_none(counts.get("effective")) if isinstance(counts, dict) else None
        if n is None:
            n = int_or_none(metrics.get("sample_len"))
        shot = int_or_none(n_shots.get(task)) if task in n_shots else n_shot_default
        task_better = dict_or_empty(better.get(task))
        for key, raw in metrics.items():
            metric, filt = _split_metric(key)
            if key in _META_KEYS or metric.endswith("_stderr"):
                continue
            value = finite_number(raw)
            if value is None:
                what = "NaN" if isinstance(raw, float) and math.isnan(raw) else f"not a number ({raw!r:.40})"
                problems.append(f"{source}: {task}/{metric},{filt} is {what}; skipped")
                continue
            stderr_key = f"{metric}_stderr,{filt}" if "," in key else f"{metric}_stderr"
            raw_err = metrics.get(stderr_key)
            stderr = finite_number(raw_err)
            if raw_err is not None and stderr is None and raw_err != "N/A":
                problems.append(f"{source}: {task}/{stderr_key} is not a number ({raw_err!r:.40}); kept without stderr")
            hib = task_better.get(metric)
            rows.append(
                EvalRow(
                    task=str(task),
                    metric=f"{metric},{filt}",
                    value=value,
                    stderr=stderr,
                    n=n,
                    n_shot=shot,
                    task_version=None if version is None else str(version),
                    higher_is_better=hib if isinstance(hib, bool) else None,
                )
            )
    # Task and metric names come from the file: a newline in one must not break a one-line message.
    return rows, [_printable(p) for p in problems]


def _arg_order(entry: tuple[str, Any]) -> int:
    digits = "".join(ch for ch in entry[0] if ch.isdigit())
    return int(digits) if digits else 0


def samples_from_results(results: dict[str, Any]) -> list[SampleRecord]:
    """Per-document records from the ``samples`` of an in-memory lm-eval result."""
    configs = results.get("configs") or {}
    records: list[SampleRecord] = []
    for task, items in (results.get("samples") or {}).items():
        output_type = (configs.get(task) or {}).get("output_type", "")
        for item in items:
            args = item.get("arguments") or []
            if isinstance(args, dict):  # as lm-eval's --log_samples files write them: {"gen_args_0": {"arg_0": ...}}
                args = [list(a.values()) if isinstance(a, dict) else a for _, a in sorted(args.items(), key=_arg_order)]
            prompt = str(args[0][0]) if args and isinstance(args[0], (list, tuple)) and args[0] else ""
            filtered = item.get("filtered_resps") or []
            response: str | None = None
            choices: tuple[str, ...] | None = None
            lls: tuple[float, ...] | None = None
            if output_type in ("multiple_choice", "loglikelihood"):
                lls = tuple(float(r[0]) for r in filtered)
                choices = tuple(str(a[1]) for a in args)
                if output_type == "multiple_choice" and lls:
                    response = str(max(range(len(lls)), key=lls.__getitem__))
            elif output_type == "loglikelihood_rolling":
                lls = tuple(float(r) for r in filtered if finite_number(r) is not None)
            elif filtered:
                response = str(filtered[0])
            filt = item.get("filter", "none")
            for metric in item.get("metrics", []):
                records.append(
                    SampleRecord(
                        task=str(task),
                        doc_id=int(item["doc_id"]),
                        metric=f"{metric},{filt}",
                        value=finite_number(item.get(metric)),
                        target=str(item.get("target")),
                        prompt=prompt,
                        response=response,
                        choices=choices,
                        loglikelihoods=lls,
                    )
                )
    return records
