"""The lm-eval bridge: run lm-eval on a loaded model, and import lm-eval result files.

Results are named as the store names them: ``<task>/<metric>,<filter>`` (``modarith_mc/acc,none``).
Older (0.3) files with plain ``acc`` / ``acc_stderr`` keys are imported as ``acc,none``.

Nothing here reaches the network: :func:`run_lm_eval` switches the Hugging Face hub and datasets
to offline mode unless the environment explicitly says otherwise (``HF_HUB_OFFLINE=0``, for
downloading a built-in task's dataset on purpose).
"""

from __future__ import annotations

import difflib
import functools
import json
import math
import numbers
import os
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from analysis.evals.heldout import model_device
from analysis.evals.tasks import resolve_tasks, task_manager
from analysis.runs.base import MAX_STEP, check_not_lfs_pointer
from analysis.runs.stepnames import parse_step_name

# Result keys that describe a task rather than measure it.
_META_KEYS = {"alias", "name", "sample_len", " ", "group", "task"}
_FALSE = {"0", "false", "no", "off"}


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


@dataclass(frozen=True)
class EvalOutput:
    """What :func:`run_lm_eval` measured."""

    rows: tuple[EvalRow, ...]
    samples: tuple[SampleRecord, ...]
    settings: dict[str, Any] = field(default_factory=dict)
    elapsed_s: float = 0.0
    problems: tuple[str, ...] = ()

    def values(self) -> dict[str, float]:
        """``{"<task>/<metric>,<filter>": value}``."""
        return {row.name: row.value for row in self.rows}


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


@dataclass(frozen=True)
class DerivedRow:
    """A group score computed at import from its subtasks' rows: ``row`` plus how it was derived."""

    row: EvalRow
    note: str  # "mean of 57 hendrycksTest-* subjects"
    subjects: int


# --------------------------------------------------------------------------- running


def _ensure_offline() -> None:
    """Keep lm-eval, transformers and datasets off the network unless the user opted in."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _FALSE:
        return
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    # Both libraries read the variable once at import; flip the flags if they are loaded already.
    import datasets.config
    import huggingface_hub.constants

    huggingface_hub.constants.HF_HUB_OFFLINE = True
    datasets.config.HF_HUB_OFFLINE = True
    datasets.config.HF_DATASETS_OFFLINE = True


BACKENDS = ("auto", "onepass", "hf")


def _lm_class(backend: str):
    """The lm-eval model class (with its scoring policy bound) for a ``backend`` name."""
    if backend not in BACKENDS:
        close = difflib.get_close_matches(str(backend), BACKENDS, n=1, cutoff=0.5)
        hint = f"did you mean '{close[0]}'?" if close else f"use one of {', '.join(BACKENDS)}"
        raise ValueError(f"unknown lm-eval backend {backend!r}; {hint}")
    if backend == "hf":
        from lm_eval.models.huggingface import HFLM

        return HFLM
    from analysis.evals.onepass import OnePassLM

    return functools.partial(OnePassLM, onepass="always" if backend == "onepass" else "auto")


def run_lm_eval(
    model: torch.nn.Module,
    tokenizer: Any,
    tasks: list[str],
    *,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    log_samples: bool = True,
    seed: int = 0,
    bootstrap_iters: int = 1000,
    task_dir: str | Path | None = None,
    data_dir: str | Path | None = None,
    allow_builtin: bool = True,
    backend: str = "auto",
) -> EvalOutput:
    """Evaluate a loaded causal LM with lm-eval on bundled tasks, built-in task names or task YAML paths.

    The model is wrapped in ``lm_eval.models.huggingface.HFLM`` as an object (lm-eval then
    uses the model's own device and dtype and never loads anything), and ``tokenizer`` is
    used as given: BOS is only added if its own special-token handling adds it.
    ``device``, when given, must be where the model already is. ``seed=0`` reproduces
    lm-eval's default seeds (python 0, numpy/torch/few-shot 1234); other seeds shift all four.
    ``bootstrap_iters`` only matters for metrics without a closed-form stderr (perplexity,
    bleu, ...): acc / exact_match use the sample standard error. ``task_dir``: where bundled
    task YAMLs are materialised (default: a per-user temp folder); ``data_dir``: the bundled
    task data (default ``data/tasks``). A built-in task whose dataset is not in the local
    cache raises ValueError instead of downloading it.

    ``backend`` scores loglikelihood and multiple-choice requests: "hf" with lm-eval's HFLM (one
    forward per choice), "onepass" with :class:`analysis.evals.onepass.OnePassLM` (one forward per
    context, then the choices from its cache), "auto" (default) with OnePassLM on the tasks where
    that saves work and HFLM on the others (single-token choices, short contexts). The three give
    the same log-likelihoods to float rounding (1e-6 relative, as HFLM across batch sizes).
    """
    lm_class = _lm_class(backend)
    plan = resolve_tasks(tasks, task_dir=task_dir, data_dir=data_dir, allow_builtin=allow_builtin)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    here = model_device(model, device)
    _ensure_offline()
    # lm-eval's bootstrap otherwise forks a pool of cpu_count() processes from this one (torch
    # threads and all); its serial path draws the same seeded resamples, so results are equal.
    os.environ.setdefault("DISABLE_MULTIPROC", "1")
    if getattr(tokenizer, "pad_token", None) is None:
        import copy

        tokenizer = copy.deepcopy(tokenizer)  # HFLM would otherwise set a pad token on the caller's tokenizer

    import lm_eval

    manager = task_manager(plan.include_path, plan.include_defaults)
    was_training = model.training
    start = time.perf_counter()
    try:
        lm = lm_class(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(here))
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(plan.specs),
            task_manager=manager,
            num_fewshot=num_fewshot,
            limit=limit,
            bootstrap_iters=bootstrap_iters,
            log_samples=log_samples,
            random_seed=seed,
            numpy_random_seed=seed + 1234,
            torch_random_seed=seed + 1234,
            fewshot_random_seed=seed + 1234,
        )
    except ConnectionError as err:
        # datasets raises this, without touching the network, for a built-in task whose data
        # is not in the local cache while the hub is offline.
        raise ValueError(
            f"{err}; the task's dataset is not in the local Hugging Face cache: download it once "
            "(HF_HUB_OFFLINE=0, with network access) or use a task YAML with local data_files"
        ) from None
    finally:
        model.train(was_training)  # HFLM switches the model to eval mode
    elapsed = time.perf_counter() - start
    if results is None:  # only on non-zero ranks of a distributed launch
        raise ValueError("lm-eval returned no results (not rank 0); run single-process")
    rows, problems = rows_from_results(results, source="lm-eval")
    samples = samples_from_results(results) if log_samples else ()
    settings = {
        "tasks": list(plan.specs),
        "batch_size": batch_size,
        "limit": limit,
        "num_fewshot": num_fewshot,
        "seed": seed,
        "bootstrap_iters": bootstrap_iters,
        "lm_eval_version": getattr(lm_eval, "__version__", None),
        # Reported, never part of a cache key: the backends agree to float rounding, so a value
        # cached under one is the value the other would compute.
        "backend": backend,
    }
    return EvalOutput(
        rows=tuple(rows), samples=tuple(samples), settings=settings, elapsed_s=elapsed, problems=tuple(problems)
    )


# --------------------------------------------------------------------------- result parsing


def _number(value: Any) -> float | None:
    """A finite float, or None for anything else (strings, "N/A", bools, NaN, inf)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    try:
        value = float(value)
    except OverflowError:  # a JSON integer too big for a float
        return None
    return value if math.isfinite(value) else None


def _int_or_none(value: Any) -> int | None:
    value = _number(value)
    return None if value is None else int(value)


def _split_metric(key: str) -> tuple[str, str]:
    """("acc", "none") from "acc,none"; plain 0.3 keys ("acc") get the "none" filter."""
    metric, _, filt = key.partition(",")
    return metric, (filt or "none")


def _printable(text: str) -> str:
    """``text`` with control characters written as escapes (``\\n``, ``\\x00``), so it stays on one line."""
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


def _dict_or_empty(value: Any) -> dict[str, Any]:
    """``value`` when it is an object, else an empty one (published files leave sections out, or null them)."""
    return value if isinstance(value, dict) else {}


def rows_from_results(results: dict[str, Any], *, source: str, n_shot_default: int | None = None):
    """Turn an lm-eval results dict (either schema) into EvalRows; return ``(rows, problems)``.

    Values that are not finite numbers are skipped with a note in ``problems``; a stderr of
    "N/A" (or missing, or not a number) becomes None.
    """
    n_shots = _dict_or_empty(results.get("n-shot"))
    versions = _dict_or_empty(results.get("versions"))
    n_samples = _dict_or_empty(results.get("n-samples"))
    better = _dict_or_empty(results.get("higher_is_better"))
    rows: list[EvalRow] = []
    problems: list[str] = []
    for task, metrics in results["results"].items():
        if not isinstance(metrics, dict):
            problems.append(f"{source}: results['{task}'] is not an object; skipped")
            continue
        version = versions.get(task)
        counts = n_samples.get(task)
        n = _int_or_none(counts.get("effective")) if isinstance(counts, dict) else None
        if n is None:
            n = _int_or_none(metrics.get("sample_len"))
        shot = _int_or_none(n_shots.get(task)) if task in n_shots else n_shot_default
        task_better = _dict_or_empty(better.get(task))
        for key, raw in metrics.items():
            metric, filt = _split_metric(key)
            if key in _META_KEYS or metric.endswith("_stderr"):
                continue
            value = _number(raw)
            if value is None:
                what = "NaN" if isinstance(raw, float) and math.isnan(raw) else f"not a number ({raw!r:.40})"
                problems.append(f"{source}: {task}/{metric},{filt} is {what}; skipped")
                continue
            stderr_key = f"{metric}_stderr,{filt}" if "," in key else f"{metric}_stderr"
            raw_err = metrics.get(stderr_key)
            stderr = _number(raw_err)
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
                lls = tuple(float(r) for r in filtered if _number(r) is not None)
            elif filtered:
                response = str(filtered[0])
            filt = item.get("filter", "none")
            for metric in item.get("metrics", []):
                records.append(
                    SampleRecord(
                        task=str(task),
                        doc_id=int(item["doc_id"]),
                        metric=f"{metric},{filt}",
                        value=_number(item.get(metric)),
                        target=str(item.get("target")),
                        prompt=prompt,
                        response=response,
                        choices=choices,
                        loglikelihoods=lls,
                    )
                )
    return records


# --------------------------------------------------------------------------- importing files


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


def parse_results_file(path: str | Path, step: int | None = None) -> ImportedEvals:
    """Read an lm-eval results JSON (current or 0.3 schema) and attribute it to a checkpoint step.

    The step comes from ``revision=...stepN`` in ``config.model_args`` (or
    ``config.model_revision``), else from the path (``results_step1000.json``,
    ``step_1000/results.json``, ``checkpoint-1000/``), else from ``step``; otherwise ValueError.
    Non-numeric and NaN values are skipped and listed in ``problems``.
    """
    path = Path(path)
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
    config = _dict_or_empty(data.get("config"))
    model_args = config.get("model_args")
    found: tuple[int, str] | None = None
    rev = _revision(model_args)
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
    legacy_shot = _int_or_none(config.get("num_fewshot"))
    rows, problems = rows_from_results(data, source=str(path), n_shot_default=legacy_shot)
    if not rows:
        raise ValueError(f"{path}: no numeric metric values under 'results'; nothing to import")
    if isinstance(model_args, dict):
        model_args = ",".join(f"{k}={v}" for k, v in model_args.items())
    groups = _dict_or_empty(data.get("groups"))
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
        date=_number(data.get("date")),
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
    configs = _dict_or_empty(data.get("configs"))
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


# --------------------------------------------------------------------------- group scores

# The 57 MMLU subjects (Hendrycks et al.), as lm-eval names them after ``hendrycksTest-`` (0.3) or ``mmlu_`` (0.4).
MMLU_SUBJECTS = frozenset(
    [
        "abstract_algebra",
        "anatomy",
        "astronomy",
        "business_ethics",
        "clinical_knowledge",
        "college_biology",
        "college_chemistry",
        "college_computer_science",
        "college_mathematics",
        "college_medicine",
        "college_physics",
        "computer_security",
        "conceptual_physics",
        "econometrics",
        "electrical_engineering",
        "elementary_mathematics",
        "formal_logic",
        "global_facts",
        "high_school_biology",
        "high_school_chemistry",
        "high_school_computer_science",
        "high_school_european_history",
        "high_school_geography",
        "high_school_government_and_politics",
        "high_school_macroeconomics",
        "high_school_mathematics",
        "high_school_microeconomics",
        "high_school_physics",
        "high_school_psychology",
        "high_school_statistics",
        "high_school_us_history",
        "high_school_world_history",
        "human_aging",
        "human_sexuality",
        "international_law",
        "jurisprudence",
        "logical_fallacies",
        "machine_learning",
        "management",
        "marketing",
        "medical_genetics",
        "miscellaneous",
        "moral_disputes",
        "moral_scenarios",
        "nutrition",
        "philosophy",
        "prehistory",
        "professional_accounting",
        "professional_law",
        "professional_medicine",
        "professional_psychology",
        "public_relations",
        "security_studies",
        "sociology",
        "us_foreign_policy",
        "virology",
        "world_religions",
    ]
)
# group name -> (subtask prefix, its subjects). 0.4's ``mmlu_stem`` & co. are groups, not subjects: the
# subject list keeps them (and other ``mmlu_*`` variants) out of the mean.
GROUPS = {"mmlu": (("hendrycksTest-", MMLU_SUBJECTS), ("mmlu_", MMLU_SUBJECTS))}


def group_means(rows: list[EvalRow], present: Collection[str] = frozenset()) -> tuple[list[DerivedRow], list[str]]:
    """Group scores a result file lacks, from its subtasks: ``(derived rows, one-line notes)``.

    For each known group (MMLU: ``hendrycksTest-<subject>`` in 0.3 files, ``mmlu_<subject>`` in 0.4)
    whose subtasks are in ``rows`` but whose own row is not (nor in ``present``, the file's ``groups``):
    per metric, the **unweighted mean over the subjects present in the file**, as lm-eval's older
    aggregate and the usual "MMLU average" do (lm-eval 0.4's own ``mmlu`` row weights subjects by
    their size, so it is a different number, kept apart by the ``derived`` parameter). The rule needs
    no particular number of subjects: a file with 4 of the 57 gives the mean of those 4, and
    ``DerivedRow.subjects`` says how many. A metric is derived only when every subject present has
    it, all with the same shot count; its stderr is sqrt(sum se_i^2) / k (subjects independent),
    or None when any subject lacks one; ``n`` is the subjects' total when all say it.
    """
    derived: list[DerivedRow] = []
    notes: list[str] = []
    have = {row.task for row in rows} | set(present)
    for group, families in GROUPS.items():
        if group in have:
            continue
        found = []
        for prefix, subjects in families:
            mine = [r for r in rows if r.task.startswith(prefix) and r.task[len(prefix) :] in subjects]
            if mine:
                found.append((prefix, mine))
        if len(found) != 1:
            if found:
                names = " and ".join(f"{prefix}*" for prefix, _ in found)
                notes.append(f"both {names} subtasks; no {group} mean derived (import them from separate files)")
            continue
        prefix, mine = found[0]
        tasks = sorted({r.task for r in mine})
        by_metric: dict[str, dict[str, EvalRow]] = {}
        for r in mine:
            by_metric.setdefault(r.metric, {})[r.task] = r
        for metric, per_task in sorted(by_metric.items()):
            if len(per_task) != len(tasks) or len({r.n_shot for r in per_task.values()}) != 1:
                continue
            parts = [per_task[t] for t in tasks]
            k = len(parts)
            errs = [r.stderr for r in parts if r.stderr is not None]
            sizes = [r.n for r in parts if r.n is not None]
            better = {r.higher_is_better for r in parts}
            row = EvalRow(
                task=group,
                metric=metric,
                value=sum(r.value for r in parts) / k,
                stderr=math.sqrt(sum(e * e for e in errs)) / k if len(errs) == k else None,
                n=sum(sizes) if len(sizes) == k else None,
                n_shot=parts[0].n_shot,
                task_version=None,
                higher_is_better=better.pop() if len(better) == 1 else None,
            )
            derived.append(DerivedRow(row, f"mean of {k} {prefix}* subjects", k))
    return derived, notes
