"""Run sources: where checkpoints and training logs come from."""

from __future__ import annotations

from analysis.runs.base import Checkpoint, Run

__all__ = ["Checkpoint", "Run"]
