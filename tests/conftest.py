"""Shared fixtures: a fresh cache file and a cache holding two synthetic runs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.runs.base import Checkpoint, Run
from analysis.store import Store

ROOT = Path(__file__).resolve().parent.parent
# Artefacts worth looking at after a run (screenshots, reports) land here.
OUT = ROOT / "out" / "tests"

# Nothing in the suite may reach a model or dataset hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "cache.duckdb"


def synthetic_run(name: str, offset: float = 0.0, n_steps: int = 120) -> Run:
    """A run with a power-law training loss and five checkpoints (no weights on disk)."""
    steps = np.arange(1, n_steps + 1)
    rng = np.random.default_rng(len(name))
    loss = 3.0 * steps**-0.3 + offset + 0.02 * rng.standard_normal(len(steps))
    log = pd.DataFrame({"step": steps, "tokens": steps * 512, "metric": "train/loss", "value": loss})
    ckpts = [Checkpoint(int(s), f"/runs/{name}/step_{s}", int(s) * 512, f"fp-{name}-{s}") for s in (1, 10, 30, 60, 120)]
    return Run(name=name, source=f"/runs/{name}", checkpoints=ckpts, log=log)


@pytest.fixture
def populated_db(db: Path) -> Path:
    store = Store(db)
    store.register_run(synthetic_run("alpha"))
    store.register_run(synthetic_run("beta", offset=0.4))
    return db
