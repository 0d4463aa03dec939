"""Bundled offline lm-eval tasks, and turning user task names into what lm-eval can load.

The task templates live in ``data/tasks/<folder>/<task>.yaml`` next to their JSONL data, with
``data_files`` relative to that folder. lm-eval resolves relative ``data_files`` against the
working directory, not the YAML's folder, so :func:`materialize_tasks` writes final YAMLs with
absolute paths into a folder that becomes lm-eval's ``include_path``.

Bundled tasks (metrics are lm-eval keys ``<metric>,<filter>``):

- ``modarith_em``: generate_until on "a + b =", greedy, first generated word vs the answer;
  ``exact_match,first_word``.
- ``modarith_mc``: the right answer and three distractors fixed per (a, b), scored by
  log-likelihood; ``acc,none`` and ``acc_norm,none``.
- ``antonyms_mc``: "the opposite of hot is" with four word choices; ``acc,none``, ``acc_norm,none``.
- ``counting_em``: "how many words : dog dog dog ?" -> "three"; ``exact_match,first_word``.
- ``sequence_ll``: "monday tuesday wednesday" -> "thursday" by log-likelihood; ``acc,none``
  (the answer is the greedy continuation) and ``perplexity,none``.

The modarith data (``heldout.jsonl``, ``train.jsonl``) is generated with the demo runs; the
language tasks' data is written by hand and ships with the project.
"""

from __future__ import annotations

import difflib
import functools
import json
import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2] / "data" / "tasks"


@dataclass(frozen=True)
class BundledTask:
    """One task shipped with the project: its template and what lm-eval reports for it."""

    name: str
    folder: str  # under the task data dir
    output_type: str
    metrics: tuple[str, ...]  # lm-eval result keys, "<metric>,<filter>"
    description: str

    @property
    def template(self) -> str:
        return f"{self.folder}/{self.name}.yaml"


BUNDLED_TASKS: dict[str, BundledTask] = {
    t.name: t
    for t in (
        BundledTask(
            "modarith_em",
            "modarith",
            "generate_until",
            ("exact_match,first_word",),
            "modular arithmetic on held-out pairs, greedy answer, exact match",
        ),
        BundledTask(
            "modarith_mc",
            "modarith",
            "multiple_choice",
            ("acc,none", "acc_norm,none"),
            "modular arithmetic on held-out pairs, 4 choices by log-likelihood",
        ),
        BundledTask(
            "antonyms_mc",
            "antonyms",
            "multiple_choice",
            ("acc,none", "acc_norm,none"),
            "word antonyms, 4 choices by log-likelihood",
        ),
        BundledTask(
            "counting_em",
            "counting",
            "generate_until",
            ("exact_match,first_word",),
            "count repeated words, greedy answer, exact match",
        ),
        BundledTask(
            "sequence_ll",
            "sequence",
            "loglikelihood",
            ("acc,none", "perplexity,none"),
            "next item of a familiar sequence, by log-likelihood",
        ),
    )
}

# Tasks whose data is generated with the demo runs rather than shipped.
_GENERATED_DATA = {"modarith_em", "modarith_mc"}
_LANGUAGE_TASKS = ("antonyms_mc", "counting_em", "sequence_ll")


@dataclass(frozen=True)
class TaskPlan:
    """What to hand lm-eval: task specs (names or absolute YAML paths) and how to index them."""

    specs: tuple[str, ...]
    include_path: Path
    include_defaults: bool  # True only when a built-in lm-eval task was asked for


def bundled_task_names() -> list[str]:
    """Names of the tasks shipped with the project, in a stable order."""
    return list(BUNDLED_TASKS)


def default_task_dir() -> Path:
    """Where bundled task YAMLs are materialised when the caller names no folder."""
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return Path(tempfile.gettempdir()) / f"checkpoint-divergence-tasks-{uid}"


def read_jsonl(path: Path, required: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file, one a line (blank lines skipped), each holding the ``required`` keys;
    a bad line is a one-line ValueError naming the file and the line."""
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not valid JSON ({err.msg}); write one JSON object per line") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{number}: expected a JSON object; write one JSON object per line")
        missing = [key for key in required if key not in record]
        if missing:
            wanted = " and ".join(repr(k) for k in required)
            raise ValueError(f"{path}:{number}: needs {wanted}; write one such object per line")
        records.append(record)
    if not records:
        raise ValueError(f"{path}: no records; the file must hold one JSON object per line")
    return records


def modarith_choices(record: dict[str, Any], pool: list[str]) -> tuple[list[str], int]:
    """The four choices of one modarith_mc item and the index of the right one.

    Distractors are drawn from ``pool`` (the numbers seen in the data) by a generator seeded
    with the item's (a, b), so every run, checkpoint and machine scores the same choices; the
    right answer's position is drawn too, so a model that prefers one slot gains nothing.
    """
    answer = str(record["answer"])
    # A string seed goes through sha512 inside random.Random: stable across processes.
    rng = random.Random(f"modarith_mc:{record.get('a')}:{record.get('op', '+')}:{record.get('b')}")
    candidates = sorted((x for x in set(pool) if x != answer), key=_number_key)
    if len(candidates) < 3:
        raise ValueError("modarith_mc: need at least 4 distinct numbers in the data to build choices")
    choices = [answer, *rng.sample(candidates, 3)]
    rng.shuffle(choices)
    return choices, choices.index(answer)


def _number_key(word: str) -> tuple[int, int | str]:
    return (0, int(word)) if word.lstrip("-").isdigit() else (1, word)


def _modarith_mc_records(source: Path) -> list[dict[str, Any]]:
    records = read_jsonl(source)
    for number, record in enumerate(records, start=1):
        if "prompt" not in record or "answer" not in record:
            raise ValueError(f"{source}: record {number} lacks 'prompt' or 'answer'; regenerate the modarith data")
    pool = sorted(
        {str(r[k]) for r in records for k in ("a", "b", "answer") if k in r},
        key=_number_key,
    )
    out = []
    for record in records:
        choices, label = modarith_choices(record, pool)
        out.append({**record, "choices": choices, "label": label})
    return out


def _write_if_changed(path: Path, text: str) -> None:
    # Unchanged files keep their mtime, so the datasets cache keyed on it stays valid; the
    # temporary name plus os.replace keeps concurrent workers from reading half a file.
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _task_available(task: BundledTask, data_dir: Path) -> tuple[bool, str]:
    template = data_dir / task.template
    if not template.is_file():
        return False, f"{template}: task template missing; restore data/tasks from the project"
    cfg = yaml.safe_load(template.read_text(encoding="utf-8"))
    splits = cfg["dataset_kwargs"]["data_files"]
    # The test split first: it is the file a missing-data message should name.
    for _, rel in sorted(splits.items(), key=lambda kv: kv[0] != "test"):
        if not (template.parent / rel).is_file():
            hint = (
                "generate the modarith data first (the demo build writes it)"
                if task.name in _GENERATED_DATA
                else "restore data/tasks from the project"
            )
            return False, f"{template.parent / rel}: missing data for task '{task.name}'; {hint}"
    return True, ""


def materialize_tasks(dest_dir: str | Path, data_dir: str | Path | None = None) -> Path:
    """Write the bundled task YAMLs with absolute data paths into ``dest_dir``; return it.

    The returned folder is an lm-eval ``include_path``. Tasks whose data is missing (modarith
    before the demo data exists) are left out; asking for one by name then fails in
    :func:`resolve_tasks` with the reason. Files are only rewritten when their content
    changes, so repeated calls are cheap and keep the datasets cache valid.
    """
    data_dir = Path(data_dir) if data_dir is not None else DEFAULT_DATA_DIR
    dest = Path(dest_dir).resolve()
    dest.mkdir(parents=True, exist_ok=True)
    for task in BUNDLED_TASKS.values():
        out_yaml = dest / f"{task.name}.yaml"
        ok, _ = _task_available(task, data_dir)
        if not ok:
            out_yaml.unlink(missing_ok=True)  # a stale YAML would point at data that is gone
            continue
        template = data_dir / task.template
        cfg = yaml.safe_load(template.read_text(encoding="utf-8"))
        files: dict[str, str] = {}
        for split, rel in cfg["dataset_kwargs"]["data_files"].items():
            source = (template.parent / rel).resolve()
            if task.name == "modarith_mc":
                generated = dest / task.name / f"{split}.jsonl"
                lines = "".join(json.dumps(r) + "\n" for r in _modarith_mc_records(source))
                _write_if_changed(generated, lines)
                files[split] = str(generated)
            else:
                files[split] = str(source)
        cfg["dataset_kwargs"]["data_files"] = files
        # Keep the datasets' Arrow cache beside the generated YAMLs rather than in ~/.cache.
        cfg["dataset_kwargs"]["cache_dir"] = str(dest / ".hf_datasets")
        _write_if_changed(out_yaml, yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True))
    return dest


@functools.lru_cache(maxsize=4)
def _cached_manager(include_path: str, include_defaults: bool, signature: tuple[str, ...]):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=include_defaults)


def task_manager(include_path: str | Path, include_defaults: bool):
    """An lm-eval TaskManager over ``include_path`` (plus the built-ins if asked), one per process.

    Indexing lm-eval's ~14,700 built-in tasks takes ~6 s, so managers are cached; the key
    includes the folder's YAML names, so a changed set of bundled tasks gets a fresh index.
    """
    include_path = Path(include_path)
    signature = tuple(sorted(p.name for p in include_path.glob("*.yaml")))
    return _cached_manager(str(include_path), include_defaults, signature)


def _looks_like_path(spec: str) -> bool:
    return spec.endswith((".yaml", ".yml")) or os.sep in spec or "/" in spec


def check_task_yaml(path: str | Path) -> Path:
    """Validate a user task YAML enough to fail early with a one-line message; return its absolute path."""
    from lm_eval.tasks._yaml_loader import load_yaml

    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"{path}: task YAML not found; pass an lm-eval task name or the path of an existing task YAML")
    try:
        # resolve_func=False: do not import the task's Python helpers just to validate it.
        cfg = load_yaml(path, resolve_func=False, recursive=True)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ValueError(f"{path}{where}: not valid YAML; fix the syntax of the task file") from None
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: cannot read task YAML ({err}); fix the task file or its include") from None
    if not any(key in cfg for key in ("task", "group", "class")):
        raise ValueError(f"{path}: no 'task' or 'group' key; an lm-eval task YAML must name its task")
    return path.resolve()


def _unknown(name: str, known: list[str] | tuple[str, ...]) -> ValueError:
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    if close:
        return ValueError(f"unknown task '{name}'; did you mean '{close[0]}'?")
    bundled = ", ".join(BUNDLED_TASKS)
    return ValueError(f"unknown task '{name}'; use a bundled task ({bundled}), an lm-eval task or a task YAML path")


def resolve_tasks(
    tasks: list[str],
    *,
    task_dir: str | Path | None = None,
    data_dir: str | Path | None = None,
    allow_builtin: bool = True,
) -> TaskPlan:
    """Check task names and paths and materialise the bundled tasks; return what lm-eval needs.

    Each entry is a bundled task name, an lm-eval built-in task/group/tag name, or the path of
    a task YAML. Built-in names are only indexed (~6 s, cached per process) when a name is
    neither bundled nor a path; ``allow_builtin=False`` refuses them without indexing.
    Raises ValueError("unknown task 'x'; did you mean 'y'?") for a name nobody knows.
    """
    if not tasks:
        raise ValueError("no tasks given; name at least one task (e.g. modarith_mc)")
    data_dir = Path(data_dir) if data_dir is not None else DEFAULT_DATA_DIR
    include = materialize_tasks(task_dir if task_dir is not None else default_task_dir(), data_dir)
    specs: list[str] = []
    need_builtin = False
    for spec in tasks:
        spec = spec.strip()
        if spec in BUNDLED_TASKS:
            ok, why = _task_available(BUNDLED_TASKS[spec], data_dir)
            if not ok:
                raise ValueError(why)
            specs.append(spec)
        elif _looks_like_path(spec):
            specs.append(str(check_task_yaml(spec)))
        else:
            if not allow_builtin:
                raise _unknown(spec, list(BUNDLED_TASKS))
            known = task_manager(include, True).all_tasks
            if spec not in known:
                raise _unknown(spec, known)
            specs.append(spec)
            need_builtin = True
    return TaskPlan(specs=tuple(specs), include_path=include, include_defaults=need_builtin)


def _language_records(name: str, data_dir: Path) -> list[dict[str, Any]]:
    task = BUNDLED_TASKS[name]
    return read_jsonl(data_dir / task.folder / "test.jsonl") + read_jsonl(data_dir / task.folder / "train.jsonl")


def task_vocabulary(data_dir: str | Path | None = None) -> list[str]:
    """Every whitespace-separated word in the bundled language tasks (prompts, choices, answers, solutions).

    For building word-level tokenizers that can run those tasks without unknown tokens.
    """
    data_dir = Path(data_dir) if data_dir is not None else DEFAULT_DATA_DIR
    words: set[str] = set()
    for name in _LANGUAGE_TASKS:
        for record in _language_records(name, data_dir):
            for key in ("prompt", "answer", "solution"):
                if key in record:
                    words.update(str(record[key]).split())
            for choice in record.get("choices", []):
                words.update(str(choice).split())
    return sorted(words)


def bundled_proxy_items(name: str, data_dir: str | Path | None = None) -> list[tuple[str, str]]:
    """(prompt, expert solution) pairs of a bundled task's test split, for the proxy metrics.

    modarith: the solution is the answer token. Language tasks carry a hand-written
    ``solution`` field (for sequence_ll the next three items, not only the next one).
    """
    data_dir = Path(data_dir) if data_dir is not None else DEFAULT_DATA_DIR
    if name not in BUNDLED_TASKS:
        raise _unknown(name, list(BUNDLED_TASKS))
    task = BUNDLED_TASKS[name]
    ok, why = _task_available(task, data_dir)
    if not ok:
        raise ValueError(why)
    if name in _GENERATED_DATA:
        path = data_dir / task.folder / "heldout.jsonl"
        return [(str(r["prompt"]), str(r["answer"])) for r in read_jsonl(path)]
    path = data_dir / task.folder / "test.jsonl"
    return [(str(r["prompt"]), str(r["solution"])) for r in read_jsonl(path)]
