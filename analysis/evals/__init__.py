"""Evaluations of one loaded checkpoint: held-out loss, lm-eval scores, token-level proxies.

Pure functions of (model, tokenizer, data, params): no database, no job state. The job runner
loads a checkpoint once and hands the model object to each of them. lm-eval itself is only
imported when :func:`run_lm_eval` runs.
"""

from __future__ import annotations

from analysis.evals.heldout import LossResult, ProbeSet, heldout_loss, load_probe_set
from analysis.evals.lmeval import (
    EvalOutput,
    EvalRow,
    ImportedEvals,
    SampleRecord,
    parse_results_file,
    run_lm_eval,
)
from analysis.evals.proxy import HIGHER_IS_BETTER as PROXY_HIGHER_IS_BETTER
from analysis.evals.proxy import ProxyResult, proxy_metrics
from analysis.evals.tasks import (
    BUNDLED_TASKS,
    bundled_proxy_items,
    bundled_task_names,
    materialize_tasks,
    resolve_tasks,
    task_vocabulary,
)

__all__ = [
    "BUNDLED_TASKS",
    "PROXY_HIGHER_IS_BETTER",
    "EvalOutput",
    "EvalRow",
    "ImportedEvals",
    "LossResult",
    "ProbeSet",
    "ProxyResult",
    "SampleRecord",
    "bundled_proxy_items",
    "bundled_task_names",
    "heldout_loss",
    "load_probe_set",
    "materialize_tasks",
    "parse_results_file",
    "proxy_metrics",
    "resolve_tasks",
    "run_lm_eval",
    "task_vocabulary",
]
