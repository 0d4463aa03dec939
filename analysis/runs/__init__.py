"""Run sources: where checkpoints and training logs come from."""

from __future__ import annotations

from analysis.runs.base import LOG_COLUMNS, Checkpoint, Run, empty_log
from analysis.runs.hub import hub_checkpoints, parse_hub_path, parse_revision
from analysis.runs.load import fill_tokens, load_run
from analysis.runs.local import (
    as_model_folder,
    checkpoint_parts,
    discover_checkpoints,
    fingerprint,
    parse_step_name,
)
from analysis.runs.logs import LogResult, find_logs, merge_logs, metric_name, read_log

__all__ = [
    "LOG_COLUMNS",
    "Checkpoint",
    "LogResult",
    "Run",
    "as_model_folder",
    "checkpoint_parts",
    "discover_checkpoints",
    "empty_log",
    "fill_tokens",
    "find_logs",
    "fingerprint",
    "hub_checkpoints",
    "load_run",
    "merge_logs",
    "metric_name",
    "parse_hub_path",
    "parse_revision",
    "parse_step_name",
    "read_log",
]
