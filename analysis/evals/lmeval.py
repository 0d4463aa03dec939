"""The lm-eval bridge: run lm-eval on a loaded model (this module), and import lm-eval result files.

The result schema lives in :mod:`analysis.evals.lmeval_results`, result files on disk in
:mod:`analysis.evals.lmeval_files`, derived group scores in :mod:`analysis.evals.lmeval_groups`;
their public names are importable from here too.

Nothing here reaches the network: :func:`run_lm_eval` switches the Hugging Face hub and datasets
to offline mode unless the environment explicitly says otherwise (``HF_HUB_OFFLINE=0``, for
downloading a built-in task's dataset on purpose).
"""

from __future__ import annotations

import difflib
import functools
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from analysis.evals.heldout import model_device
from analysis.evals.lmeval_files import (
    ImportedEvals,
    continuous_from_sample_files,
    parse_results_file,
    step_from_text,
)
from analysis.evals.lmeval_groups import GROUPS, MMLU_SUBJECTS, DerivedRow, group_means
from analysis.evals.lmeval_results import EvalRow, SampleRecord, rows_from_results, samples_from_results
from analysis.evals.tasks import resolve_tasks, task_manager

__all__ = [
    "BACKENDS",
    "GROUPS",
    "MMLU_SUBJECTS",
    "DerivedRow",
    "EvalOutput",
    "EvalRow",
    "ImportedEvals",
    "SampleRecord",
    "continuous_from_sample_files",
    "group_means",
    "parse_results_file",
    "rows_from_results",
    "run_lm_eval",
    "samples_from_results",
    "step_from_text",
]

_FALSE = {"0", "false", "no", "off"}


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
