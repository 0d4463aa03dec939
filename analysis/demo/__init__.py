"""The embedded demo: two tiny mixture-of-experts runs with the same train loss and different downstream.

Both runs train an OLMoE (transformers' mixture-of-experts causal LM) from scratch on modular
arithmetic written as text, ``<bos> a + b = c <eos>`` with ``c = (a + b) mod p``. The objective is
the cross-entropy of the answer token and of ``<eos>`` (the prompt is given, not learnt). The runs
differ in weight decay and in how many of the pairs they see (nested splits, see :func:`split_pairs`):

- ``grokking`` (weight decay 1.0, 70% of the pairs): learns the rule; held-out accuracy climbs to
  near 1 while train loss settles;
- ``memorizing`` (weight decay 0, 30% of the pairs): reaches the same train loss and accuracy
  sooner, and stays at chance on the held-out pairs for the whole run.

Both are scored on the same held-out pairs, which neither trains on. So a train-loss curve cannot
tell the two apart; downstream accuracy (and, the dashboard's question, some internal signal) can.
Each run folder holds::

    <run>/run.json            settings, model summary, split sizes, checkpoint steps, versions
    <run>/metrics.jsonl       one JSON object per step: step, tokens, train/*, and eval/* on eval steps
    <run>/step_<N>/           save_pretrained (safetensors) + tokenizer, log-spaced N, last step included
    <run>/COMPLETE            written last; holds the config, so an interrupted build is redone

Logged losses and accuracies are of the answer token only (``<eos>`` is trivially predictable after a
few steps and would only halve the numbers); ``train/*`` is measured on the step's batch before its
update, ``eval/*`` on the first ``eval_samples`` held-out pairs after the update. The task data,
``data/tasks/modarith/{heldout,train}.jsonl``, is written by :func:`write_task_files` from the same
:func:`split_pairs` the trainer uses (a test checks that the files still match).

The package holds one module per part, and re-exports their names here (``from analysis.demo import
DEMO_RUNS`` and ``analysis.demo.train_run`` are the ways to reach them):

    config  the task's operators and layout, DemoConfig and its checkpoint steps, the demo runs, their jobs
    data    the train/held-out split, task records and files, the vocabulary, token ids
    model   building the OLMoE, its answer-token loss and accuracy
    train   one run into a folder, the completion marker, every run side by side

``DEMO_VERSION`` is read through this package at call time, so setting ``analysis.demo.DEMO_VERSION``
changes which markers count as complete.
"""

from __future__ import annotations

from analysis.demo.config import (
    ANSWER_POS,
    DEMO_EVAL,
    DEMO_FINETUNE,
    DEMO_RUNS,
    DEMO_VERSION,
    EVAL_TRAIN_FRACTION,
    FINETUNE_CHECKPOINTS,
    MARKER,
    OPS,
    SEQ_LEN,
    DemoConfig,
    checkpoint_steps,
    demo_eval_spec,
    demo_finetune_spec,
    finetune_steps,
)
from analysis.demo.config import _is_prime as _is_prime
from analysis.demo.config import _n_train_unordered as _n_train_unordered
from analysis.demo.data import (
    TASK_DIR,
    encode_pairs,
    eval_pairs,
    split_pairs,
    task_records,
    vocabulary,
    write_task_files,
)
from analysis.demo.model import _token_stats as _token_stats
from analysis.demo.model import build_model, evaluate
from analysis.demo.train import _batches as _batches
from analysis.demo.train import _marker_text as _marker_text
from analysis.demo.train import _train_in_child as _train_in_child
from analysis.demo.train import build_demo, is_complete, train_run

# Names this module has always offered, from the shared model helpers.
from analysis.models import EOS as EOS
from analysis.models import build_word_tokenizer as build_word_tokenizer
from analysis.models import tiny_moe_config as tiny_moe_config

__all__ = [
    "ANSWER_POS",
    "DEMO_EVAL",
    "DEMO_FINETUNE",
    "DEMO_RUNS",
    "DEMO_VERSION",
    "EVAL_TRAIN_FRACTION",
    "FINETUNE_CHECKPOINTS",
    "MARKER",
    "OPS",
    "SEQ_LEN",
    "TASK_DIR",
    "DemoConfig",
    "build_demo",
    "build_model",
    "checkpoint_steps",
    "demo_eval_spec",
    "demo_finetune_spec",
    "encode_pairs",
    "eval_pairs",
    "evaluate",
    "finetune_steps",
    "is_complete",
    "split_pairs",
    "task_records",
    "train_run",
    "vocabulary",
    "write_task_files",
]
