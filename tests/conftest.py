"""Shared fixtures: a fresh cache file and a cache holding two synthetic runs."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import settings

from analysis.runs.base import Checkpoint, Run
from analysis.store import Store

ROOT = Path(__file__).resolve().parent.parent
# Artefacts worth looking at after a run (screenshots, reports) land here.
OUT = ROOT / "out" / "tests"

# Nothing in the suite may reach a model or dataset hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Property tests draw the same examples on every run, so a red suite is reproducible and a green one
# stays green; HYPOTHESIS_PROFILE=explore draws fresh random examples, ten times as many, to hunt for
# new failures (pin each one it finds with @example).
settings.register_profile("ci", derandomize=True, database=None, max_examples=60)
settings.register_profile("explore", derandomize=False, max_examples=500)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.hookimpl(tryfirst=True)  # before -m "not slow" deselects
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A browser test is always slow: `make test-fast` leaves it out even where its module has no slow mark."""
    for item in items:
        if item.get_closest_marker("browser") is not None and item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch intra-op thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``), restored after.

    Tiny tensors gain nothing from intra-op threads, and on a shared CPU the threads'
    synchronisation made the metric tests up to 20x slower.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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


@pytest.fixture
def divergence_db(db: Path) -> Path:
    """Two runs with the same loss curve; in "grok" the score rises late, while the loss is flat."""
    from analysis.store import ResultRow

    store = Store(db)
    steps = [1, 10, 20, 40, 60, 80, 100, 120]
    for name, late_gain in (("grok", 0.8), ("stuck", 0.0)):
        log_steps = np.arange(1, 121)
        loss = 2.0 * np.exp(-log_steps / 5.0) + 0.5  # flat (within 0.2%) from step 40 on
        log = pd.DataFrame({"step": log_steps, "tokens": log_steps * 512, "metric": "train/loss", "value": loss})
        ckpts = [Checkpoint(s, f"/runs/{name}/step_{s}", s * 512, f"fp-{name}-{s}") for s in steps]
        store.register_run(Run(name, f"/runs/{name}", ckpts, log))
        rows = []
        for s in steps:
            score = 0.1 + (late_gain * min(1.0, max(0.0, (s - 40) / 60)) if s > 40 else 0.0)
            rows.append(ResultRow(name, s, "toy/acc,none", score, f"fp-{name}-{s}", stderr=0.02, n=400))
        store.write_results(rows)
    return db
