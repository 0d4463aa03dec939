"""The dashboard as a new user drives it (AppTest, real cache files): samples, learning-rate phases, ..."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import numpy as np
import pandas as pd
import pytest

from analysis.charts import PHASE_FILLS
from analysis.flops import count_parameters
from analysis.runs import load_run
from analysis.runs.base import Checkpoint, Run
from analysis.store import ResultRow, SampleRow, Store, UnitUpdate
from pages._state import PAGES
from tests.conftest import synthetic_run
from tests.factories import save_tiny_checkpoint
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
    keys = [t["name"] for t in fig["data"] if t.get("name", "").startswith("lr ")]
    assert keys == ["lr warmup · grok, stuck", "lr decay · grok"]  # stuck: constant after warmup, no decay
    decay = [s for s in fig["layout"]["shapes"] if s["fillcolor"] == PHASE_FILLS["decay"]]
    assert len(decay) == 2 and 70 <= decay[0]["x0"] <= 80 and decay[0]["x1"] == 120
    assert any("overlaps a learning-rate decay" in w.value for w in at.warning)
    table = at.dataframe[0].value
    grok = table[table["run"] == "grok"]
    assert len(grok) and grok["lr_schedule"].str.startswith("overlaps the lr decay").all()


def test_divergence_page_without_an_lr_log_has_no_bands_and_no_note(divergence_db: Path, monkeypatch) -> None:
    at = open_app(divergence_db, monkeypatch, page="pages/divergence.py", loss="train/loss", score="toy/acc,none")
    assert not at.exception and not at.error
    fig = figure_of(at.get("plotly_chart")[0])
    assert not any(t.get("name", "").startswith("lr ") for t in fig["data"])
    assert not [s for s in fig["layout"].get("shapes", []) if s["fillcolor"] in PHASE_FILLS.values()]
    assert not any("learning-rate decay" in w.value for w in at.warning)
    assert (at.dataframe[0].value["lr_schedule"] == "").all()


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "step_10")


def real_run(root: Path, checkpoint: Path, steps=(10, 20, 40, 60, 80, 100)) -> Path:
    """A run folder of real (identical) tiny checkpoints and a CSV log with tokens and a learning rate."""
    for step in steps:
        shutil.copytree(checkpoint, root / f"step_{step}")
    s = np.arange(1, max(steps) + 1)
    lr = np.where(s > 80, 1e-3 * (max(steps) - s) / 20, 1e-3)
    log = pd.DataFrame({"step": s, "tokens": s * 256, "loss": 3.0 / np.sqrt(s), "lr": lr})
    log.to_csv(root / "log.csv", index=False)
    return root


@pytest.fixture
def flops_db(db: Path, tmp_path: Path, tiny_checkpoint: Path) -> Path:
    """One run of real checkpoints (a model size to read) with a downstream score; nothing else."""
    store = Store(db)
    run = load_run(real_run(tmp_path / "tiny", tiny_checkpoint), name="tiny")
    store.register_run(run)
    rows = [ResultRow("tiny", c.step, "toy/acc,none", 0.1 + c.step / 100, c.fingerprint, stderr=0.01, n=100)
            for c in run.checkpoints]  # fmt: skip
    store.write_results(rows)
    return db


def test_flops_axis_is_six_n_d_from_the_checkpoints_header(flops_db: Path, tiny_checkpoint, monkeypatch) -> None:
    landing = open_app(flops_db, monkeypatch, page=None, runs="tiny", x="flops")
    assert landing.radio(key="x").value == "flops"
    assert not [c for c in landing.sidebar.caption if "No FLOPs" in c.value]
    at = open_app(flops_db, monkeypatch, runs="tiny", x="flops")
    assert not at.exception and not at.error
    fig = figure_of(at.get("plotly_chart")[0])
    assert fig["layout"]["xaxis"]["title"]["text"] == "FLOPs (log)"  # the Runs page's default
    line = next(t for t in fig["data"] if t.get("name") == "tiny")
    n = count_parameters(tiny_checkpoint).active
    assert line["x"][:3] == [6 * n * 256, 6 * n * 512, 6 * n * 768]


def test_a_run_without_a_model_size_falls_back_to_tokens_with_one_line(flops_db: Path, monkeypatch) -> None:
    Store(flops_db).register_run(synthetic_run("nosize"))  # checkpoints that are not on this disk
    landing = open_app(flops_db, monkeypatch, page=None, runs=["tiny", "nosize"], x="flops")
    (note,) = [c.value.replace("\\", "") for c in landing.sidebar.caption if "No FLOPs" in c.value]
    assert note.startswith("No FLOPs for run 'nosize': model size unknown") and note.endswith("shows tokens instead.")
    at = open_app(flops_db, monkeypatch, runs=["tiny", "nosize"], x="flops")
    assert not at.exception and not at.error
    assert figure_of(at.get("plotly_chart")[0])["layout"]["xaxis"]["title"]["text"] == "tokens seen (log)"


@pytest.mark.parametrize("page", [script for script, *_ in PAGES])
@pytest.mark.slow
def test_every_page_opens_on_the_flops_axis(flops_db: Path, monkeypatch, page: str) -> None:
    at = open_app(flops_db, monkeypatch, page=page, runs="tiny", x="flops", score="toy/acc,none", loss="train/loss")
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    for chart in at.get("plotly_chart"):
        fig = figure_of(chart)
        titles = [v["title"]["text"] for k, v in fig["layout"].items() if k.startswith("xaxis") and "title" in v]
        assert not any("tokens" in t or t.startswith("step") for t in titles), (page, titles)
        if any(t.startswith("FLOPs") for t in titles):  # drawn on FLOPs: the points are there, not blank panels
            assert any(len(t.get("x") or []) for t in fig["data"]), (page, titles)


@pytest.fixture
def busy_db(divergence_db: Path):
    """The divergence cache with job 1 running on "stuck" (3 checkpoints, a live worker process) and job 2 queued."""
    worker = subprocess.Popen(["sleep", "120"])  # stands in for the worker: only its pid is checked
    store = Store(divergence_db)
    spec = {"run": "stuck", "tasks": ["toy"], "metrics": ["heldout_loss"]}
    running = store.create_job("stuck", spec, [("80", 2), ("100", 2), ("120", 2)])
    store.set_job(running, "running", worker_pid=worker.pid)
    store.create_job("grok", {"run": "grok", "metrics": ["hessian_trace"]}, [("10", 1)])
    try:
        yield divergence_db, running
    finally:
        worker.kill()
        worker.wait()


def status_lines(at) -> list[str]:
    return [c.value for c in at.caption if "units" in c.value and c.value.startswith(":material/pending:")]


@pytest.mark.parametrize("page", ["pages/divergence.py", "pages/runs.py", "pages/samples.py", "pages/report.py"])
@pytest.mark.slow
def test_every_page_shows_running_and_queued_jobs_with_a_link_to_the_jobs_page(busy_db, monkeypatch, page) -> None:
    db, _ = busy_db
    at = open_app(db, monkeypatch, page=page)
    assert not at.exception
    lines = status_lines(at)
    assert len(lines) == 2
    assert "Job 1 running · run stuck · toy, heldout\\_loss · 0/3 units" in lines[0]
    assert "Job 2 queued · run grok · hessian\\_trace · 0/1 units" in lines[1]
    links = [e for e in at.get("page_link") if e.proto.label == "Jobs" and e.proto.page.endswith("jobs")]
    assert links, "no link to the Jobs page next to the status line"


def test_the_status_line_follows_checkpoints_as_they_land_and_goes_when_the_jobs_end(busy_db, monkeypatch):
    db, job = busy_db
    at = open_app(db, monkeypatch, page="pages/divergence.py", runs="stuck", score="toy/acc,none")
    store = Store(db)
    fp = store.checkpoints("stuck").set_index("step").loc[120, "fingerprint"]
    store.write_results([ResultRow("stuck", 120, "toy/acc,none", 0.99, fp, stderr=0.001, n=1000)])
    store.set_unit(UnitUpdate(job, "120", "done", 2, 2))
    at.run()
    assert "1/3 units" in status_lines(at)[0]
    traces = figure_of(at.get("plotly_chart")[0])["data"]
    score = next(t for t in traces if t.get("yaxis") == "y2" and t["name"] == "stuck")
    assert score["y"][-1] == pytest.approx(0.99)  # the new checkpoint is on the chart
    for job_id in (1, 2):
        store.set_job(job_id, "done")
    at.run()
    assert not status_lines(at) and not at.exception


def test_a_running_job_whose_worker_died_says_so_and_an_idle_cache_shows_nothing(divergence_db, monkeypatch):
    assert not status_lines(open_app(divergence_db, monkeypatch, page="pages/runs.py"))
    dead = subprocess.Popen(["true"])
    dead.wait()
    store = Store(divergence_db)
    job = store.create_job("stuck", {"run": "stuck", "metrics": ["heldout_loss"]}, [("80", 1)])
    store.set_job(job, "running", worker_pid=dead.pid)
    (line,) = status_lines(open_app(divergence_db, monkeypatch, page="pages/runs.py"))
    assert line.endswith("worker stopped: start one on the Jobs page")


def submit_add_run(at, path: str, **fields: str):
    at.text_input(key="add_path").input(path)
    for key, value in fields.items():
        at.text_input(key=f"add_{key}").input(value)
    next(b for b in at.button if b.label == "Add run").click()
    return at.run()


def test_adding_a_local_run_from_the_runs_page_shows_it_without_a_restart(
    populated_db, tmp_path, tiny_checkpoint, monkeypatch
) -> None:
    folder = real_run(tmp_path / "fresh-run", tiny_checkpoint)
    at = open_app(populated_db, monkeypatch)
    assert not at.exception and "fresh-run" not in set(at.dataframe[0].value["name"])
    submit_add_run(at, str(folder))
    assert not at.exception and not at.error
    assert at.success[0].value.startswith("registered run 'fresh-run': 6 checkpoints (steps 10..100), 6 new")
    assert "fresh-run" in set(at.dataframe[0].value["name"])  # the table, read again after the write
    assert at.multiselect(key="runs").value == ["alpha", "beta", "fresh-run"]  # and picked in the sidebar
    assert len(Store(populated_db).checkpoints("fresh-run")) == 6


def test_a_bad_path_on_the_runs_page_is_one_line_and_writes_nothing(populated_db, monkeypatch) -> None:
    at = open_app(populated_db, monkeypatch)
    before = Store(populated_db).generation()
    submit_add_run(at, "/no/such/run", name="ghost")
    assert not at.exception
    (error,) = at.error
    assert "no such folder" in error.value and "\n" not in error.value
    assert Store(populated_db).generation() == before  # nothing written
    assert "ghost" not in set(Store(populated_db).runs()["name"])
    submit_add_run(at, "hf://org/model", filter="re:step(")
    assert "not a valid regular expression" in at.error[0].value


def test_a_hub_run_added_from_the_runs_page_keeps_the_filtered_revisions(db, monkeypatch) -> None:
    branches = [SimpleNamespace(name=n, target_commit=f"sha-{n}") for n in ("main", "step1000", "step1500", "step2000")]
    monkeypatch.setattr(huggingface_hub, "list_repo_refs", lambda repo_id: SimpleNamespace(branches=branches, tags=[]))
    at = open_app(db, monkeypatch)  # an empty cache: the form is open, with what to do
    assert not at.exception and at.expander[0].proto.expanded
    submit_add_run(at, "hf://EleutherAI/pythia-14m", filter="step*000")
    assert not at.exception and not at.error
    assert "2 checkpoints (steps 1000..2000)" in at.success[0].value
    assert list(Store(db).checkpoints("pythia-14m")["revision"]) == ["step1000", "step2000"]


def test_a_page_opened_by_link_keeps_its_sidebar_after_a_widget_changes(populated_db: Path, monkeypatch) -> None:
    at = open_app(populated_db, monkeypatch, page="pages/runs.py")  # runs the page script alone, as a deep link
    assert at.multiselect(key="runs").value == ["alpha", "beta"]
    at.toggle(key="logy").set_value(True).run()
    assert not at.exception
    assert at.multiselect(key="runs").value == ["alpha", "beta"] and at.radio(key="x").value == "step"
    assert [link.proto.label for link in at.sidebar.get("page_link")][:2] == ["Divergence", "Overview"]
