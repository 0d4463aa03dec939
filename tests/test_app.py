"""The dashboard through Streamlit's AppTest: real pages, a real cache file."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from tests.conftest import ROOT

APP = str(ROOT / "app.py")


def figure_of(chart) -> dict:
    """The Plotly figure behind an AppTest chart element, with base64 arrays decoded."""
    spec = json.loads(chart.proto.spec)

    def decode(node):
        if isinstance(node, dict):
            if "bdata" in node and "dtype" in node:
                return np.frombuffer(base64.b64decode(node["bdata"]), dtype=node["dtype"]).tolist()
            return {k: decode(v) for k, v in node.items()}
        if isinstance(node, list):
            return [decode(v) for v in node]
        return node

    return decode(spec)


def open_app(db: Path, monkeypatch: pytest.MonkeyPatch, page: str | None = "pages/runs.py", **query: str) -> AppTest:
    """Run the app (landing on ``page``) against the cache file ``db``, with URL query parameters."""
    monkeypatch.setenv("CDD_DB", str(db))
    at = AppTest.from_file(APP, default_timeout=60)
    for key, value in query.items():
        at.query_params[key] = value
    at.run()
    return at.switch_page(page).run() if page else at


def test_runs_page_shows_both_runs_and_their_loss_curves(populated_db: Path, monkeypatch) -> None:
    landing = open_app(populated_db, monkeypatch, page=None)
    assert landing.multiselect(key="runs").value == ["alpha", "beta"]  # the sidebar picks every run
    at = open_app(populated_db, monkeypatch)
    assert not at.exception and not at.error
    assert at.title[0].value == "Runs"
    charts = at.get("plotly_chart")
    assert len(charts) == 1
    fig = figure_of(charts[0])
    lines = {t["name"]: t for t in fig["data"] if t.get("showlegend", True) is not False}
    assert set(lines) == {"alpha", "beta"}
    assert len(lines["alpha"]["x"]) == 120
    assert fig["layout"]["xaxis"]["type"] == "log"


def test_deep_link_selects_run_metric_and_axes(populated_db: Path, monkeypatch) -> None:
    at = open_app(populated_db, monkeypatch, runs="beta", x="tokens", logx="false", smooth="0.6", large="true")
    assert not at.exception
    fig = figure_of(at.get("plotly_chart")[0])
    names = [t["name"] for t in fig["data"]]
    assert "beta" in names and "alpha" not in names
    assert "beta (raw)" in names  # smoothing draws the raw curve behind the smoothed one
    assert fig["layout"]["xaxis"]["type"] == "linear"
    assert fig["layout"]["xaxis"]["title"]["text"].startswith("tokens")
    assert fig["layout"]["font"]["size"] == 20
    beta = next(t for t in fig["data"] if t["name"] == "beta")
    assert beta["x"][0] == 512  # tokens, not steps


def test_empty_cache_says_what_to_run(db: Path, monkeypatch) -> None:
    at = open_app(db, monkeypatch)
    assert not at.exception
    assert "python -m analysis demo" in at.info[0].value
    assert not at.get("plotly_chart")


def test_corrupt_cache_is_one_error_not_a_traceback(tmp_path: Path, monkeypatch) -> None:
    bad = tmp_path / "cache.duckdb"
    bad.write_bytes(b"garbage" * 1000)
    at = open_app(bad, monkeypatch)
    assert not at.exception
    assert "cannot open the cache" in at.error[0].value


def test_run_without_a_log_says_how_to_add_one(db: Path, monkeypatch) -> None:
    from analysis.runs.base import Run
    from analysis.store import Store
    from tests.conftest import synthetic_run

    run = synthetic_run("nolog")
    Store(db).register_run(Run(run.name, run.source, run.checkpoints))
    at = open_app(db, monkeypatch)
    assert not at.exception
    assert "--log" in at.warning[0].value


def test_evaluate_queues_a_job_and_jobs_page_shows_and_cancels_it(populated_db: Path, tmp_path: Path, monkeypatch):
    from analysis.store import Store

    probe = tmp_path / "probe.jsonl"
    probe.write_text('{"text": "1 + 2 = 3"}\n')
    at = open_app(populated_db, monkeypatch)
    at.switch_page("pages/evaluate.py").run()
    assert not at.exception and at.title[0].value == "Evaluate"
    at.multiselect(key="eval_steps").set_value([10, 30])
    at.multiselect(key="eval_metrics").set_value(["heldout_loss"])
    at.text_input(key="eval_data").set_value(str(probe))
    at.button(key="queue_only").click().run()
    assert not at.error, at.error[0].value
    assert "Queued job 1: 2 checkpoints" in at.success[0].value
    units = Store(populated_db).job_units(1)
    assert units["unit"].tolist() == ["10", "30"] and set(units["status"]) == {"queued"}

    at.switch_page("pages/jobs.py").run()
    assert not at.exception
    assert "Job 1" in at.markdown[0].value and "0/2 checkpoints" in at.get("progress")[0].proto.text
    at.button(key="cancel-1").click().run()
    assert Store(populated_db).jobs()["status"].tolist() == ["cancelled"]


def test_evaluate_reports_a_bad_request_in_one_line(populated_db: Path, monkeypatch) -> None:
    at = open_app(populated_db, monkeypatch)
    at.switch_page("pages/evaluate.py").run()
    at.multiselect(key="eval_metrics").set_value(["heldout_loss"])
    at.text_input(key="eval_data").set_value("/nonexistent/probes.jsonl")
    at.button(key="queue_only").click().run()
    assert not at.exception
    assert "no such file" in at.error[0].value


@pytest.mark.slow
def test_app_never_shows_a_lock_error_while_another_process_writes(populated_db: Path, monkeypatch) -> None:
    import subprocess
    import sys
    import time

    from tests.test_store import WRITER

    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(populated_db), str(ROOT), "12", "0.02"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert writer.stdout.readline().strip() == "ready"
        at = open_app(populated_db, monkeypatch)
        reruns = 0
        while writer.poll() is None:
            at.run()
            assert not at.exception and not at.error, "a page showed an error while the writer ran"
            assert at.get("plotly_chart")
            reruns += 1
            time.sleep(0.05)
        assert reruns >= 2
    finally:
        writer.wait(timeout=60)
    assert writer.returncode == 0


def test_divergence_page_finds_the_planted_window(divergence_db: Path, monkeypatch) -> None:
    at = open_app(divergence_db, monkeypatch, page=None)  # the landing page is the Divergence view
    assert not at.exception and not at.error
    assert at.title[0].value == "Divergence"
    assert at.selectbox(key="loss").value == "train/loss"
    assert at.selectbox(key="score").value == "toy/acc,none"
    windows = at.dataframe[0].value
    grok = windows[windows["run"] == "grok"]
    assert len(grok) == 1 and grok.iloc[0]["kind"] == "grokking"
    assert (grok.iloc[0]["start"], grok.iloc[0]["end"]) == (40, 100)
    assert "stuck" not in set(windows["run"])
    fig = figure_of(at.get("plotly_chart")[0])
    assert len(fig["layout"]["shapes"]) >= 2  # the window shaded on both rows
    assert len(at.get("plotly_chart")) == 3  # curves, trajectory, ranking


def test_correlations_over_a_span_of_checkpoints_chosen_in_the_url(divergence_db: Path, monkeypatch) -> None:
    from analysis import divergence as dv
    from analysis.store import Store

    at = open_app(divergence_db, monkeypatch, page=None, corr_from="40", corr_to="120")
    assert not at.exception and not at.error
    assert (at.selectbox(key="corr_from").value, at.selectbox(key="corr_to").value) == (40, 120)
    table = at.dataframe[1].value.set_index("run")
    assert table["n"].to_dict() == {"grok": 5, "stuck": 5}  # checkpoints 40, 60, 80, 100, 120
    frame = Store(divergence_db).long_table(["grok", "stuck"])
    want = dv.correlations(frame, "train/loss", ["toy/acc,none"], window=(40, 120)).set_index("run")
    assert table.loc["grok", "spearman"] == pytest.approx(want.loc["grok", "spearman"], abs=1e-3)
    # The full span, by default, counts all 8 checkpoints; a span holding 2 says to widen it.
    assert set(open_app(divergence_db, monkeypatch, page=None).dataframe[1].value["n"]) == {8}
    narrow = open_app(divergence_db, monkeypatch, page=None, corr_from="100", corr_to="120")
    assert any("widen it" in c.value for c in narrow.caption)


def test_a_page_run_reads_the_write_generation_once_and_sees_new_results_on_the_next(
    divergence_db: Path, monkeypatch
) -> None:
    from analysis.store import ResultRow, Store

    at = open_app(divergence_db, monkeypatch, page=None)
    reads = []
    original = Store.generation
    monkeypatch.setattr(Store, "generation", lambda self: reads.append(1) or original(self))
    at.run()
    assert not at.exception and len(reads) == 1  # sidebar, table, windows and ranking share one read
    before = len(at.dataframe[0].value)
    # A result written between two runs is on the next one: the generation is not kept across runs.
    store = Store(divergence_db)
    fp = store.checkpoints("stuck").set_index("step").loc[120, "fingerprint"]
    store.write_results([ResultRow("stuck", 120, "toy/acc,none", 0.99, fp, stderr=0.001, n=1000)])
    at.run()
    assert len(reads) == 2
    assert len(at.dataframe[0].value) > before  # the jump at the last checkpoint is now a window


def test_compare_page_shows_the_gap_at_matched_loss(divergence_db: Path, monkeypatch) -> None:
    at = open_app(divergence_db, monkeypatch, page="pages/compare.py", ref="grok")
    assert not at.exception and not at.error
    matched = at.dataframe[0].value
    stuck = matched[matched["run"] == "stuck"]
    assert len(stuck) >= 3
    # At the lowest common loss, "grok" is ahead by the planted late gain.
    lowest = stuck.loc[stuck["loss_level"].idxmin()]
    assert lowest["gap"] == pytest.approx(-0.8, abs=0.05)
    # Same loss, different score: the last checkpoint of "grok" sits above the line fitted to both runs,
    # "stuck" below it, 0.8 apart (the planted gain). Checked against numpy's fit of the fixture's points.
    metrics = {m.label.split(",")[0]: float(m.value) for m in at.metric if "last checkpoint" in m.label}
    steps = np.array([1, 10, 20, 40, 60, 80, 100, 120])
    loss = 2.0 * np.exp(-steps / 5.0) + 0.5
    grok = 0.1 + np.where(steps > 40, 0.8 * np.clip((steps - 40) / 60, 0, 1), 0.0)
    slope, intercept = np.polyfit(np.r_[loss, loss], np.r_[grok, np.full(8, 0.1)], 1)
    want = grok[-1] - (intercept + slope * loss[-1])
    assert metrics["grok"] == pytest.approx(want, abs=1e-3) and metrics["grok"] > 0.5
    assert metrics["stuck"] == pytest.approx(want - 0.8, abs=1e-3) and metrics["stuck"] < 0
    residual = figure_of(at.get("plotly_chart")[2])
    assert {t["name"] for t in residual["data"]} == {"grok", "stuck"}


def test_divergence_without_scores_says_what_to_run(populated_db: Path, monkeypatch) -> None:
    at = open_app(populated_db, monkeypatch, page=None)
    assert not at.exception
    assert "no a downstream score" not in at.warning[0].value
    assert "python -m analysis eval" in at.code[0].value


@pytest.mark.parametrize(
    ("page", "metric"), [("pages/geometry.py", "hessian_trace"), ("pages/pathways.py", "pathway_distance")]
)
def test_signal_pages_chart_cached_metrics_against_downstream(divergence_db: Path, monkeypatch, page, metric) -> None:
    from analysis.store import ResultRow, Store

    store = Store(divergence_db)
    empty = open_app(divergence_db, monkeypatch, page=page)
    assert not empty.exception and "No " in empty.warning[0].value  # says what to run
    rows = [ResultRow("grok", s, metric, 100.0 / s, f"fp-grok-{s}", stderr=1.0, n=8) for s in (10, 40, 80, 120)]
    store.write_results(rows)
    at = open_app(divergence_db, monkeypatch, page=page)
    assert not at.exception and not at.error
    assert at.selectbox(key="signal").value == metric
    charts = at.get("plotly_chart")
    assert len(charts) == 2
    curve = figure_of(charts[0])
    grok = next(t for t in curve["data"] if t.get("name") == "grok")
    assert grok["x"] == [10, 40, 80, 120] and grok["y"][0] == pytest.approx(10.0)


def _write_samples(db: Path, run: str, metric: str, table: dict[int, list[float]], records=None) -> None:
    from analysis.store import SampleRow, Store

    rows = [
        SampleRow(run, step, metric, "h", str(i), v, (records or {}).get((step, i), {"prompt": f"q{i}", "target": "1"}))
        for step, values in table.items()
        for i, v in enumerate(values)
    ]
    Store(db).write_results([], rows)


def test_samples_page_shows_which_items_flipped_and_when(divergence_db: Path, monkeypatch) -> None:
    empty = open_app(divergence_db, monkeypatch, page="pages/samples.py")
    assert not empty.exception and "no per-sample" in empty.warning[0].value
    # Item 0 learnt at 40, item 1 always right, item 2 forgotten at 80, item 3 never right.
    _write_samples(
        divergence_db, "grok", "toy/acc,none",
        {10: [0, 1, 1, 0], 20: [0, 1, 1, 0], 40: [1, 1, 1, 0], 80: [1, 1, 0, 0]},
    )  # fmt: skip
    at = open_app(divergence_db, monkeypatch, page="pages/samples.py", sample_run="grok")
    assert not at.exception and not at.error
    assert at.title[0].value == "Samples"
    assert {m.label: m.value for m in at.metric} == {
        "learnt": "1", "unstable": "0", "forgotten": "1", "always right": "1", "never right": "1",
    }  # fmt: skip
    table = at.dataframe[0].value.set_index("sample_id")
    assert set(table.index) == {"0", "2"}  # learnt, unstable and forgotten by default
    assert table.loc["0", "learnt_at"] == 40 and table.loc["2", "status"] == "forgotten"
    charts = at.get("plotly_chart")
    assert len(charts) == 2
    heat = figure_of(charts[1])["data"][0]
    assert heat["y"] == ["0", "2"] and heat["x"] == ["10", "20", "40", "80"]
    assert np.reshape(heat["z"], (2, 4)).tolist() == [[0, 0, 1, 1], [1, 1, 1, 0]]  # 2-D arrays arrive flat
    # The URL picks the status filter.
    every = open_app(divergence_db, monkeypatch, page="pages/samples.py", sample_run="grok", status="never right")
    assert list(every.dataframe[0].value["sample_id"]) == ["3"]


def test_pathways_page_charts_metrics_inside_memorised_groups(divergence_db: Path, monkeypatch) -> None:
    losses = {10: [3.0, 3.0, 3.0], 40: [0.01, 3.0, 3.0], 80: [0.01, 0.02, 3.0], 120: [0.01, 0.02, 3.0]}
    records = {
        (s, i): {"pathway": ["1-2", "1,3-2", "4-5,6"][i], "consistency": 0.1 * i, "consistency_normalized": 0.5}
        for s in losses
        for i in range(3)
    }
    _write_samples(divergence_db, "grok", "train/sample_loss", losses, records)
    at = open_app(divergence_db, monkeypatch, page="pages/pathways.py", group_run="grok", group_metric="sample_loss")
    assert not at.exception and not at.error
    assert "2 of 3 train samples memorised" in at.caption[0].value
    fig = figure_of(at.get("plotly_chart")[-1])
    lines = {t["name"]: t["y"] for t in fig["data"] if t.get("mode") == "lines+markers"}
    assert set(lines) == {"memorised 40", "memorised 80", "never memorised"}
    assert lines["never memorised"] == [3.0, 3.0, 3.0, 3.0]
    assert lines["memorised 80"] == pytest.approx([3.0, 3.0, 0.02, 0.02])


ZERO_SHOT = {1: 0.10, 10: 0.12, 20: 0.15, 40: 0.20, 60: 0.30, 80: 0.40, 100: 0.45, 120: 0.50}
FIVE_SHOT = {10: 0.61, 40: 0.64, 80: 0.72, 120: 0.83}  # fewer checkpoints: not the default


@pytest.fixture
def settings_db(db: Path) -> Path:
    return write_two_settings(db)


def write_two_settings(db: Path) -> Path:
    """Two runs with a training loss and toy/acc,none cached 0-shot (8 checkpoints) and 5-shot (4)."""
    import pandas as pd

    from analysis.runs.base import Checkpoint, Run
    from analysis.store import ResultRow, Store

    store = Store(db)
    for name, bump in (("grok", 0.0), ("stuck", -0.05)):
        steps = np.arange(1, 121)
        log = pd.DataFrame({"step": steps, "tokens": steps * 512, "metric": "train/loss", "value": 2.0 / steps + 0.5})
        ckpts = [Checkpoint(s, f"/runs/{name}/step_{s}", s * 512, f"fp-{name}-{s}") for s in ZERO_SHOT]
        store.register_run(Run(name, f"/runs/{name}", ckpts, log))
        rows = []
        for shots, values in ((0, ZERO_SHOT), (5, FIVE_SHOT)):
            params = {"task": "toy", "num_fewshot": shots, "limit": 400}
            rows += [
                ResultRow(name, s, "toy/acc,none", v + bump, f"fp-{name}-{s}", 0.02, 400, params)
                for s, v in values.items()
            ]
        store.write_results(rows)
    return db


SETTING_KEY = "setting_toy/acc,none"


def score_curve(at: AppTest, run: str) -> dict[float, float]:
    """The downstream curve of ``run`` in the Divergence page's first figure (the lower panel): x -> y."""
    fig = figure_of(at.get("plotly_chart")[0])
    trace = next(t for t in fig["data"] if t.get("name") == run and t.get("yaxis") == "y2" and "lines" in t["mode"])
    return dict(zip(trace["x"], trace["y"], strict=True))


def test_divergence_page_picks_one_setting_of_a_score_and_switching_redraws(settings_db: Path, monkeypatch) -> None:
    at = open_app(settings_db, monkeypatch, page=None)
    assert not at.exception and not at.error
    picker = at.selectbox(key=SETTING_KEY)
    assert picker.options == ["0-shot", "5-shot"]  # only the key that differs is named; limit is the same
    assert picker.value == "0-shot"  # 8 checkpoints against 4
    assert any("Several settings cached" in c.value for c in at.caption)
    assert score_curve(at, "grok") == pytest.approx(ZERO_SHOT, abs=1e-12)  # one setting, nothing averaged in

    picker.set_value("5-shot").run()
    assert not at.exception and not at.error
    assert score_curve(at, "grok") == pytest.approx(FIVE_SHOT, abs=1e-12)
    assert score_curve(at, "stuck") == pytest.approx({s: v - 0.05 for s, v in FIVE_SHOT.items()}, abs=1e-12)
    corr = next(d.value for d in at.dataframe if "change_spearman" in d.value.columns)
    assert set(corr["n"]) == {4}  # the correlations use the 4 checkpoints of that setting

    # The URL keeps the choice: a shared link opens on the 5-shot curve.
    shared = open_app(settings_db, monkeypatch, page=None, **{SETTING_KEY: "5-shot"})
    assert shared.selectbox(key=SETTING_KEY).value == "5-shot"
    assert score_curve(shared, "grok") == pytest.approx(FIVE_SHOT, abs=1e-12)


@pytest.mark.slow
def test_compare_and_report_pages_offer_the_same_setting_picker(settings_db: Path, monkeypatch) -> None:
    at = open_app(settings_db, monkeypatch, page="pages/compare.py")
    assert not at.exception and not at.error
    assert at.selectbox(key=SETTING_KEY).value == "0-shot"
    assert at.dataframe[0].value["downstream"].max() <= 0.5  # 0-shot scores only
    at.selectbox(key=SETTING_KEY).set_value("5-shot").run()
    assert not at.exception and not at.error
    assert at.dataframe[0].value["downstream"].min() >= 0.55  # 5-shot scores only
    report = open_app(settings_db, monkeypatch, page="pages/report.py")
    assert not report.exception and not report.error
    assert report.selectbox(key=SETTING_KEY).options == ["0-shot", "5-shot"]


@pytest.mark.slow
def test_forecast_page_backtests_a_hidden_end_of_an_imported_pythia_sweep(db: Path, monkeypatch) -> None:
    from analysis.__main__ import main

    assert (
        main(["import-evals", str(ROOT / "tests" / "fixtures" / "pythia" / "70m"), "--run", "p70", "--db", str(db)])
        == 0
    )
    at = open_app(db, monkeypatch, page="pages/forecast.py")
    assert not at.exception and not at.error
    at.selectbox(key="score").set_value("piqa/acc,none").run()
    at.selectbox(key="fit_until").set_value(33000).run()
    assert not at.exception and not at.error
    fig = figure_of(at.get("plotly_chart")[0])
    names = [trace.get("name") for trace in fig["data"]]
    assert {"fitted checkpoints", "hidden checkpoints", "forecast", "90% prediction band"} <= set(names)
    forecast = next(t for t in fig["data"] if t.get("name") == "forecast")
    assert len(forecast["x"]) == 11 + 1  # the 11 hidden checkpoints and the horizon (2x the last)
    covered = next(m for m in at.metric if m.label.startswith("Backtest"))
    assert covered.value.endswith("of 11")
    at.selectbox(key="method").set_value("two-step").run()  # through the sweep's only loss, lambada's perplexity
    assert not at.exception and not at.error
    assert at.selectbox(key="via").value == "lambada_openai/ppl,none"
