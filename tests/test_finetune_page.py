"""The Fine-tune page through AppTest, on a cache with a planted catastrophic-overtraining window."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.finetune.config import FinetuneConfig
from analysis.runs.base import Checkpoint, Run
from analysis.store import ResultRow, Store
from tests.test_app import figure_of, open_app

STEPS = [10, 20, 40, 60, 80, 100, 120, 140]


@pytest.fixture
def finetune_db(db: Path) -> Path:
    """Two runs whose score before fine-tuning rises; after fine-tuning "over" falls from step 80 on."""
    store = Store(db)
    params = {**asdict(FinetuneConfig(task="toy")), "other_tasks": [], "version": "1"}
    for name, fall in (("over", 0.3), ("steady", 0.0)):
        log = pd.DataFrame({"step": STEPS, "tokens": [s * 512 for s in STEPS], "metric": "train/loss",
                            "value": np.linspace(3, 2, len(STEPS))})  # fmt: skip
        ckpts = [Checkpoint(s, f"/runs/{name}/step_{s}", s * 512, f"fp-{name}-{s}") for s in STEPS]
        store.register_run(Run(name, f"/runs/{name}", ckpts, log))
        rows = []
        for i, s in enumerate(STEPS):
            pre = 0.2 + 0.08 * i
            post = 0.9 - (fall if s >= 80 else 0.0)
            fp = f"fp-{name}-{s}"
            for what, value, se in (("pre", pre, 0.02), ("post", post, 0.02), ("gain", post - pre, 0.02),
                                    ("forgetting_heldout", 0.01 * i, 0.005)):  # fmt: skip
                rows.append(ResultRow(name, s, f"finetune/toy/{what}", value, fp, se, 200, params, "1"))
            rows.append(ResultRow(name, s, "perturbation_sensitivity", 0.1 * i, fp, 0.01, 8, {"sigma": 0.01}, "1"))
        store.write_results(rows)
    return db


def test_finetune_page_shows_pre_and_post_the_planted_window_and_the_proxy(finetune_db: Path, monkeypatch) -> None:
    at = open_app(finetune_db, monkeypatch, page="pages/finetune.py")
    assert not at.exception and not at.error
    assert at.title[0].value == "Fine-tune"
    assert r"LoRA r=8 on all\-linear, 100 steps" in at.caption[0].value  # the settings every checkpoint shared
    windows = at.dataframe[0].value
    assert list(windows["run"]) == ["over"]
    w = windows.iloc[0]
    assert w["start"] < 80 <= w["end"] and w["post_change"] == pytest.approx(-0.3) and w["p_adjusted"] <= 0.05
    assert any("adjusted p" in m.value for m in at.markdown)
    prepost, effects, sens = (figure_of(c) for c in at.get("plotly_chart"))
    names = [t["name"] for t in prepost["data"]]
    assert "over, before fine-tuning" in names and "steady, after fine-tuning" in names
    assert len(prepost["layout"]["shapes"]) == 1  # the window, shaded
    assert {t["name"] for t in effects["data"]} >= {"over: gain", "steady: forgetting_heldout"}
    assert sens["data"][0]["x"] == pytest.approx([0.1 * i for i in range(len(STEPS))])


def test_finetune_page_without_results_says_what_to_run(divergence_db: Path, monkeypatch) -> None:
    at = open_app(divergence_db, monkeypatch, page="pages/finetune.py")
    assert not at.exception and not at.error
    assert "No fine-tune results" in at.warning[0].value
    assert "--metrics finetune --param finetune.task=" in at.code[0].value
