"""The dashboard as a new user drives it (AppTest, real cache files): samples, learning-rate phases, ..."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from analysis.runs.base import Checkpoint, Run
from analysis.store import SampleRow, Store
from tests.test_app import figure_of, open_app


def test_samples_page_shows_choice_strings_not_indices(divergence_db: Path, monkeypatch) -> None:
    choices = [" 61", " 43", " 84", " 71"]
    rows = [
        SampleRow("grok", step, "toy/acc,none", "h", "0", value,
                  {"prompt": "20 + 51 =", "target": "3", "response": response, "choices": choices})
        for step, value, response in ((10, 0.0, "1"), (40, 1.0, "3"))
    ]  # fmt: skip
    Store(divergence_db).write_results([], rows)
    at = open_app(divergence_db, monkeypatch, page="pages/samples.py", sample_run="grok")
    assert not at.exception and not at.error
    table = at.dataframe[0].value.set_index("sample_id")
    assert table.loc["0", "target"] == "71" and table.loc["0", "response"] == "71"


def add_lr_log(db: Path, run: str, decay_from: int | None) -> None:
    """Register ``run`` again with a learning rate logged beside its loss: warmup to step 5, decay after."""
    store = Store(db)
    log = store.log_series([run])
    steps = log["step"].to_numpy()
    lr = np.minimum(1e-3, 1e-3 * steps / 5)
    if decay_from is not None:
        lr = np.where(steps > decay_from, 1e-3 * (1 - (steps - decay_from) / (steps.max() - decay_from + 1)), lr)
    extra = log.assign(metric="train/learning_rate", value=lr)
    ckpts = [Checkpoint(int(c.step), c.path, int(c.tokens), c.fingerprint) for c in store.checkpoints(run).itertuples()]
    store.register_run(Run(run, f"/runs/{run}", ckpts, pd.concat([log, extra], ignore_index=True)))


def test_divergence_page_shades_the_lr_decay_and_notes_the_window_inside_it(divergence_db: Path, monkeypatch):
    add_lr_log(divergence_db, "grok", decay_from=70)  # the planted window (score rising from step 40) overlaps
    add_lr_log(divergence_db, "stuck", decay_from=None)  # constant after warmup: no decay band
    at = open_app(divergence_db, monkeypatch, page="pages/divergence.py", loss="train/loss", score="toy/acc,none")
    assert not at.exception and not at.error
    fig = figure_of(at.get("plotly_chart")[0])
    labels = [s["label"]["text"] for s in fig["layout"]["shapes"] if s.get("label", {}).get("text")]
    assert "decay · grok" in labels and not any(t.startswith("decay · stuck") for t in labels)
    decay = next(s for s in fig["layout"]["shapes"] if s.get("label", {}).get("text") == "decay · grok")
    assert 70 <= decay["x0"] <= 80 and decay["x1"] == 120
    assert any("overlaps a learning-rate decay" in w.value for w in at.warning)
    table = at.dataframe[0].value
    grok = table[table["run"] == "grok"]
    assert len(grok) and grok["lr_schedule"].str.startswith("overlaps the lr decay").all()


def test_divergence_page_without_an_lr_log_has_no_bands_and_no_note(divergence_db: Path, monkeypatch) -> None:
    at = open_app(divergence_db, monkeypatch, page="pages/divergence.py", loss="train/loss", score="toy/acc,none")
    assert not at.exception and not at.error
    fig = figure_of(at.get("plotly_chart")[0])
    assert not any("decay" in s.get("label", {}).get("text", "") for s in fig["layout"].get("shapes", []))
    assert not any("learning-rate decay" in w.value for w in at.warning)
    assert (at.dataframe[0].value["lr_schedule"] == "").all()
