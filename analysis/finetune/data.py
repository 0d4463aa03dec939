"""What a checkpoint is fine-tuned on and scored with.

A task is one of:

- an lm-eval task (a bundled task, a built-in name or a task YAML) with a training split: it is trained on
  its training documents (``doc_to_text`` + the target delimiter + the target; for multiple choice the right
  choice) and scored by lm-eval on its test split;
- a folder holding ``train.jsonl`` and ``test.jsonl`` of ``{"prompt": ..., "answer": ...}`` records: trained on
  the train records, scored on the test records as an lm-eval loglikelihood task (``acc,none``: the answer is
  the greedy continuation; ``perplexity,none``), from a YAML generated beside the bundled ones.

The loss is the cross-entropy of the target's tokens only (the prompt is given, not learnt).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from analysis.evals.tasks import read_jsonl
from analysis.jobs.spec import file_digest

# The demo's fine-tuning task: modular subtraction, an operation the demo runs never saw.
MODSUB_DIR = Path(__file__).resolve().parents[2] / "data" / "tasks" / "modsub"


@dataclass(frozen=True)
class Example:
    """One training example: the prompt's token ids and the target's (the loss is on the target)."""

    prompt_ids: tuple[int, ...]
    target_ids: tuple[int, ...]


@dataclass(frozen=True)
class FinetuneTask:
    """A task resolved for fine-tuning: its name in stored metrics, what lm-eval scores, its training text."""

    name: str
    eval_spec: str  # handed to run_lm_eval: a task name or a YAML path
    train: tuple[tuple[str, str], ...]  # (prompt, continuation) with the delimiter on the continuation


def _jsonl_folder(task: str) -> Path | None:
    """The folder of a prompt/answer JSONL task (``modsub`` names the bundled demo one), else None."""
    if task == "modsub":
        return MODSUB_DIR
    path = Path(task).expanduser()
    if path.is_dir():
        return path
    if path.is_file() and path.suffix == ".jsonl":
        raise ValueError(f"{path}: pass the folder that holds train.jsonl and test.jsonl, not one file")
    return None


def task_name(task: str) -> str:
    """The name a task's results are stored under (``finetune/<name>/...``), read without loading lm-eval."""
    folder = _jsonl_folder(task)
    if folder is not None:
        return folder.name
    from analysis.jobs.spec import _task_scopes

    scopes = _task_scopes(task)  # a YAML path: its task name
    return scopes[0] if scopes else task


def task_digest(task: str) -> str:
    """Content hash of what a fine-tune task reads (the JSONL folder, or the lm-eval task's data)."""
    folder = _jsonl_folder(task)
    if folder is not None:
        _check_folder(folder)
        return file_digest(folder)
    from analysis.jobs.spec import _task_digest

    return _task_digest(task)


def _check_folder(folder: Path) -> None:
    if not (folder / "train.jsonl").is_file():
        raise ValueError(
            f"{folder}: no train.jsonl, so nothing to fine-tune on; add train.jsonl "
            '({"prompt": ..., "answer": ...} per line) or pick a task with a training split'
        )
    if not (folder / "test.jsonl").is_file():
        raise ValueError(f"{folder}: no test.jsonl to score the fine-tuned model on; add one beside train.jsonl")


def _read_pairs(path: Path) -> list[tuple[str, str]]:
    return [(str(r["prompt"]), " " + str(r["answer"])) for r in read_jsonl(path, required=("prompt", "answer"))]


def _jsonl_yaml(folder: Path) -> Path:
    """An lm-eval loglikelihood task over ``folder/test.jsonl``, written where bundled tasks are materialised."""
    import yaml

    from analysis.evals.tasks import _write_if_changed, default_task_dir

    digest = file_digest(folder)
    name = f"finetune_{folder.name}_{digest[:8]}"
    cfg = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {
            "data_files": {
                "train": str((folder / "train.jsonl").resolve()),
                "test": str((folder / "test.jsonl").resolve()),
            },
            "cache_dir": str(default_task_dir() / ".hf_datasets"),
        },
        "output_type": "loglikelihood",
        "training_split": "train",
        "test_split": "test",
        "doc_to_text": "{{prompt}}",
        "doc_to_target": " {{answer}}",
        "target_delimiter": "",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
        ],
        "metadata": {"version": 1.0},
    }
    path = default_task_dir() / "finetune" / f"{name}.yaml"
    _write_if_changed(path, yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True))
    return path


def eval_spec(task: str) -> str:
    """What lm-eval scores ``task`` by: the task itself, or the YAML generated for a prompt/answer folder."""
    folder = _jsonl_folder(task)
    if folder is None:
        return task
    _check_folder(folder)
    return str(_jsonl_yaml(folder))


def load_task(task: str) -> FinetuneTask:
    """Resolve ``task`` to its training text and what scores it; one-line ValueError when it cannot train."""
    folder = _jsonl_folder(task)
    if folder is not None:
        _check_folder(folder)
        train = _read_pairs(folder / "train.jsonl")
        _read_pairs(folder / "test.jsonl")  # a broken test file fails here, before any fine-tuning
        return FinetuneTask(name=folder.name, eval_spec=str(_jsonl_yaml(folder)), train=tuple(train))
    return _lm_eval_task(task)


def _lm_eval_task(task: str) -> FinetuneTask:
    from analysis.evals.lmeval import _ensure_offline
    from analysis.evals.tasks import resolve_tasks, task_manager

    plan = resolve_tasks([task])  # unknown names: "did you mean"
    _ensure_offline()
    from lm_eval.tasks import get_task_dict

    tasks = get_task_dict(list(plan.specs), task_manager(plan.include_path, plan.include_defaults))
    if len(tasks) != 1:
        raise ValueError(f"{task}: a group of {len(tasks)} tasks; fine-tune on one task at a time")
    _, obj = next(iter(tasks.items()))
    name = task_name(task)
    if not obj.has_training_docs():
        raise ValueError(
            f"{task}: task {name!r} has no training split; fine-tuning needs one (training_split in its YAML), "
            "or pass a folder with train.jsonl and test.jsonl"
        )
    delimiter = obj.config.target_delimiter
    train = []
    for doc in obj.training_docs():
        text, target = obj.doc_to_text(doc), obj.doc_to_target(doc)
        if obj.OUTPUT_TYPE == "multiple_choice":
            choices = obj.doc_to_choice(doc)
            target = choices[target] if isinstance(target, int) else target
        if isinstance(target, list):
            target = target[0] if target else ""
        train.append((str(text), f"{delimiter}{target}"))
    if not train:
        raise ValueError(f"{task}: the training split of {name!r} is empty; fine-tuning needs examples")
    return FinetuneTask(name=str(name), eval_spec=task, train=tuple(train))


def encode_examples(train: tuple[tuple[str, str], ...], tokenizer, max_length: int) -> list[Example]:
    """Token ids of every (prompt, continuation): the prompt with the tokenizer's special tokens (BOS),
    the continuation without; the prompt is cut from the left so an example fits ``max_length``."""
    out = []
    for prompt, continuation in train:
        prompt_ids = tokenizer(prompt)["input_ids"]
        target_ids = tokenizer(continuation, add_special_tokens=False)["input_ids"]
        if not target_ids:
            continue
        target_ids = target_ids[: max_length - 1]
        prompt_ids = prompt_ids[-(max_length - len(target_ids)) :]
        out.append(Example(tuple(prompt_ids), tuple(target_ids)))
    if not out:
        raise ValueError("every training target is empty after tokenising; check the task's targets")
    return out


def write_modsub_task(folder: Path = MODSUB_DIR, *, p: int = 97, n_train: int = 4000, n_test: int = 400) -> Path:
    """Write the demo's fine-tuning task: ``a - b = c (mod p)`` prompt/answer pairs, train and test disjoint.

    Ordered pairs shuffled under a fixed seed (Python's ``random``, stable across platforms), the first
    ``n_test`` for test and the next ``n_train`` for training. The demo runs only ever saw ``+``.
    """
    import random

    pairs = [(a, b) for a in range(p) for b in range(p)]
    random.Random("modsub").shuffle(pairs)
    folder.mkdir(parents=True, exist_ok=True)
    for name, chunk in (("test", pairs[:n_test]), ("train", pairs[n_test : n_test + n_train])):
        lines = (
            json.dumps({"a": a, "b": b, "op": "-", "prompt": f"{a} - {b} =", "answer": str((a - b) % p)})
            for a, b in chunk
        )
        (folder / f"{name}.jsonl").write_text("".join(line + "\n" for line in lines))
    return folder
