"""Shared fixtures: a fresh cache file and a cache holding two synthetic runs."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pytest
from hypothesis import settings

from analysis.runs.base import Checkpoint, Run
from analysis.store import Store

if TYPE_CHECKING:
    import torch  # imported lazily at run time: many suites never need it

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


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--device",
        default="cpu",
        help="torch device of the device-aware tests (those taking the `device` fixture, marked `device`): "
        "cpu (default), cuda or cuda:N. `pytest -m device --device cuda` runs only those, on a GPU.",
    )


def device_problem(name: str) -> str | None:
    """Why ``--device name`` cannot run here, in one line, or None when it can."""
    if name == "cpu":
        return None  # the default: no torch import for the suites that never touch it
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        return f"--device {name}: not a torch device; use cpu, cuda or cuda:N"
    if device.type == "cpu":
        return None
    if device.type != "cuda":
        return f"--device {name}: only cpu and cuda are supported by the device-aware tests"
    if torch.version.cuda is None:
        return (
            f"--device {name}: torch {torch.__version__} is a CPU build, so no GPU can be used; "
            "install a CUDA build of torch, or leave out --device to test on the CPU"
        )
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        return f"--device {name}: torch.cuda.is_available() is False (no GPU visible; check nvidia-smi and the driver)"
    if device.index is not None and device.index >= count:
        return f"--device {name}: only {count} GPU(s) visible (cuda:0 to cuda:{count - 1})"
    return None


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "device: takes the `device` fixture, so runs on the torch device of --device")
    # A missing GPU stops the run with one line: skipping every device test instead would pass silently.
    problem = device_problem(config.getoption("--device"))
    if problem is not None:
        raise pytest.UsageError(problem)


def pytest_report_header(config: pytest.Config) -> str | None:
    name = config.getoption("--device")
    if name == "cpu":
        return None
    import torch

    gpu = torch.cuda.get_device_name(torch.device(name))
    return f"device-aware tests on {name}: {gpu}, torch {torch.__version__}, CUDA {torch.version.cuda}"


@pytest.hookimpl(tryfirst=True)  # before -m "not slow" (or -m device) selects
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A browser test is always slow: `make test-fast` leaves it out even where its module has no slow mark.

    A test that takes the `device` fixture is marked `device`, so `-m device` selects exactly the
    tests that compute on --device (a test parametrised over its own `device` argument is not one).
    """
    for item in items:
        if item.get_closest_marker("browser") is not None and item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.slow)
        callspec = getattr(item, "callspec", None)
        own = callspec is not None and "device" in callspec.params
        if "device" in getattr(item, "fixturenames", ()) and not own:
            item.add_marker(pytest.mark.device)


@pytest.fixture(scope="session")
def device(pytestconfig: pytest.Config) -> torch.device:
    """The torch device the device-aware tests compute on: ``--device`` (default cpu), checked at start-up."""
    import torch

    return torch.device(pytestconfig.getoption("--device"))


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
