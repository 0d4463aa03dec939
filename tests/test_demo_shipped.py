"""The shipped demo results: made by this code, importable in seconds, and reproducible from retrained checkpoints.

The reproduction test retrains the first two checkpoints of each demo run with the shipped seeds and
recomputes what the demo stored on them: the training log, the held-out loss and the bundled
multiple-choice task. Tolerances: the same seeds and thread count give bit-identical weights, but
another CPU's kernels may round differently and training amplifies that a little, so values must
agree to 1e-3 relative (losses) and to two documents in a hundred (accuracy). A changed config, split,
model or metric breaks this test until `make demo-rebuild` rewrites the shipped files.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from analysis import demo
from analysis.demo_data import (
    PROVENANCE,
    ROOT_TOKEN,
    SHIPPED_DIR,
    export_demo,
    import_demo,
    missing_demo_runs,
    read_provenance,
)
from analysis.store import Store

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def shipped(tmp_path_factory) -> tuple[Store, Path]:
    """A fresh cache holding the imported shipped results; the demo root they point at."""
    tmp = tmp_path_factory.mktemp("shipped")
    store = Store(tmp / "cache.duckdb")
    import_demo(store, tmp / "demo")
    return store, tmp / "demo"


def test_shipped_demo_was_made_by_this_code():
    prov = read_provenance()
    stale = "the shipped demo results are out of date: run `make demo-rebuild` and commit data/demo_results"
    assert prov["demo_version"] == demo.DEMO_VERSION, stale
    assert prov["runs"] == {n: json.loads(json.dumps(dataclasses.asdict(c))) for n, c in demo.DEMO_RUNS.items()}, stale
    assert prov["evaluation"] == json.loads(json.dumps(demo.DEMO_EVAL)), stale
    finetune = {**demo.DEMO_FINETUNE, "checkpoints": demo.FINETUNE_CHECKPOINTS}
    assert prov["finetune"] == json.loads(json.dumps(finetune)), stale
    assert prov.get("scale", 1.0) == 1.0
    for key in ("code_version", "libraries", "machine", "build_seconds", "torch_threads_per_run"):
        assert prov[key], key


def test_import_fills_an_empty_cache_with_every_run_and_page_input(shipped):
    store, root = shipped
    assert missing_demo_runs(store) == []
    manifest = json.loads((SHIPPED_DIR / "manifest.json").read_text())
    runs = store.runs().set_index("name")
    for name, cfg in demo.DEMO_RUNS.items():
        ckpts = store.checkpoints(name)
        assert ckpts["step"].tolist() == cfg.checkpoint_steps()
        assert all(p.startswith(str(root.resolve())) for p in ckpts["path"]), "paths follow the local demo root"
        assert runs.loc[name, "source"] == str((root / name).resolve())
        metrics = set(store.results(name)["metric"])
        for wanted in ("modarith_mc/acc,none", "heldout/heldout_loss", "hessian_trace", "pathway_distance"):
            assert wanted in metrics, (name, wanted)
        tuned = store.results(name)
        tuned = tuned[tuned["metric"].str.startswith("finetune/")]
        assert sorted(tuned["step"].unique()) == list(demo.finetune_steps(cfg)), name
    assert len(store.log_series(list(demo.DEMO_RUNS))) == manifest["rows"]["log_series"]


def test_cli_imports_once_and_says_so_the_second_time(tmp_path):
    db = tmp_path / "c.duckdb"
    cmd = [sys.executable, "-m", "analysis", "demo", "--db", str(db), "--root", str(tmp_path / "demo")]
    first = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    assert "imported the shipped demo results" in first.stderr
    second = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0 and "are in" in second.stderr and "imported" not in second.stderr
    assert not (tmp_path / "demo").exists(), "importing trains nothing"


def test_cli_replaces_demo_runs_cached_from_an_earlier_demo_and_nothing_else(tmp_path):
    from tests.conftest import synthetic_run

    db = tmp_path / "c.duckdb"
    store = Store(db)
    store.register_run(synthetic_run("grokking", n_steps=60))  # an older demo: other checkpoints
    store.register_run(synthetic_run("alpha", n_steps=60))
    cmd = [sys.executable, "-m", "analysis", "demo", "--db", str(db), "--root", str(tmp_path / "demo")]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "replacing grokking" in done.stderr and "imported the shipped demo results" in done.stderr
    store = Store(db)
    assert store.checkpoints("grokking")["step"].tolist() == demo.DEMO_RUNS["grokking"].checkpoint_steps()
    assert len(store.checkpoints("alpha")) > 0, "a run of the user's own is left alone"
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert "replacing" not in again.stderr and "are in" in again.stderr


def test_export_then_import_round_trips(shipped, tmp_path):
    store, root = shipped
    copy = Store(tmp_path / "copy.duckdb")
    import_demo(copy, root)
    out = tmp_path / "out"
    export_demo(copy, out, root, read_provenance())
    assert ROOT_TOKEN in pd.read_parquet(out / "checkpoints.parquet")["path"].iloc[0]
    again = Store(tmp_path / "again.duckdb")
    import_demo(again, tmp_path / "elsewhere", out)
    a, b = store.results(list(demo.DEMO_RUNS)), again.results(list(demo.DEMO_RUNS))
    key = ["run", "step", "metric", "params_hash"]
    merged = a.merge(b, on=key, suffixes=("", "_b"))
    assert len(merged) == len(a) == len(b)
    assert (merged["value"].fillna(-1) == merged["value_b"].fillna(-1)).all()
    assert again.checkpoints("grokking")["path"].iloc[0].startswith(str((tmp_path / "elsewhere").resolve()))


@pytest.mark.parametrize("damage", ["truncate", "no_provenance", "bad_provenance"])
def test_a_damaged_shipped_folder_is_refused_in_one_line_and_writes_nothing(tmp_path, damage):
    folder = tmp_path / "demo_results"
    shutil.copytree(SHIPPED_DIR, folder)
    if damage == "truncate":
        path = folder / "results.parquet"
        path.write_bytes(path.read_bytes()[:200])
    elif damage == "no_provenance":
        (folder / PROVENANCE).unlink()
    else:
        (folder / PROVENANCE).write_text("[1, 2]")
    store = Store(tmp_path / "c.duckdb")
    with pytest.raises(ValueError) as err:
        import_demo(store, tmp_path / "demo", folder)
    assert "\n" not in str(err.value) and str(folder) in str(err.value)
    assert len(store.runs()) == 0


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(demo.DEMO_RUNS))
def test_retrained_checkpoints_reproduce_the_shipped_values(shipped, tmp_path, name):
    from analysis.jobs import run_job, submit
    from analysis.jobs.spec import JobSpec
    from analysis.runs.load import load_run

    store, _ = shipped
    cfg = demo.DEMO_RUNS[name]
    steps = cfg.checkpoint_steps()[:2]
    torch.set_num_threads(read_provenance()["torch_threads_per_run"])
    run_dir = demo.train_run(cfg, tmp_path / name, until=steps[-1])
    assert not (run_dir / demo.MARKER).exists()

    # The training log: the loss of each step's batch and the held-out evaluation, to 1e-3 relative.
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ours = pd.DataFrame(logged).set_index("step")
    theirs = store.log_series(name).pivot_table(index="step", columns="metric", values="value")
    for metric in ("train/loss", "eval/loss", "eval/accuracy"):
        pair = pd.concat([ours[metric], theirs.loc[ours.index, metric]], axis=1, keys=["ours", "theirs"]).dropna()
        assert len(pair) >= len(steps), metric
        tol = 0.021 if "accuracy" in metric else 1e-3 * pair["theirs"].abs().clip(lower=1e-3)
        assert ((pair["ours"] - pair["theirs"]).abs() <= tol).all(), (metric, pair)

    # Values computed on the checkpoints: held-out loss and the multiple-choice task, as the demo stores them.
    fresh = Store(tmp_path / "fresh.duckdb")
    fresh.register_run(load_run(run_dir))
    spec = JobSpec(
        run=name, steps=tuple(steps), tasks=("modarith_mc",), metrics=("heldout_loss",), limit=demo.DEMO_EVAL["limit"]
    )
    report = run_job(fresh, submit(fresh, spec))
    assert not report.failed, report.failed
    # By step and metric: the held-out loss's parameters name the probe folder's absolute path, which differs
    # between the machine that built the shipped values and this checkout (its digest does not).
    key = ["step", "metric"]
    mine = fresh.results(name)
    shipped_rows = store.results(name)
    both = mine.merge(shipped_rows, on=key, suffixes=("", "_shipped"))
    checked = both[both["metric"].isin(["heldout/heldout_loss", "train/heldout_loss", "modarith_mc/acc,none"])]
    assert set(checked["metric"]) == {"heldout/heldout_loss", "train/heldout_loss", "modarith_mc/acc,none"}
    assert set(checked["step"]) == set(steps)
    for row in checked.itertuples():
        if row.metric.endswith("acc,none"):
            assert abs(row.value - row.value_shipped) <= 2 / demo.DEMO_EVAL["limit"] + 1e-9, row
        else:
            assert abs(row.value - row.value_shipped) <= 1e-3 * abs(row.value_shipped), row


def test_the_divergence_page_defaults_find_the_grokking_window_and_only_it(shipped):
    """The story the demo exists for, read as the Divergence page reads it with its defaults."""
    from analysis import divergence as dv
    from analysis.divergence import accuracy_first
    from analysis.samples import score_items

    store, _ = shipped
    runs = list(demo.DEMO_RUNS)
    frame = store.long_table(runs)
    names = sorted(frame["metric"].unique())
    loss, score = dv.loss_metrics(names)[0], accuracy_first(dv.downstream_metrics(names))[0]
    assert (loss, score) == ("train/loss", "modarith_mc/acc,none")
    items = score_items(store, runs, score, frame)
    windows = dv.divergence_windows(frame, loss, score, loss_tol=0.02, tol_of="range", samples=items)
    assert windows["run"].tolist() == ["grokking"] and windows["kind"].tolist() == ["grokking"], windows
    window = windows.iloc[0]
    log = store.log_series(["grokking"])
    train = log[log["metric"] == "train/loss"].set_index("step")["value"]
    fitted = int(train[train < 0.1].index.min())  # the first step the training loss is near zero
    assert window["start"] >= fitted and window["end"] - window["start"] >= 2 * fitted, (window, fitted)
    assert window["downstream_change"] > 0.3 and window["change_lo"] > 0 and window["p_adjusted"] <= 0.05


def test_pathways_opens_on_a_routing_signal_that_beats_the_loss_and_geometry_says_none_of_its_does(shipped):
    """What the signal pages open on for the shipped demo, from the predictor ranking's tested verdict."""
    from analysis import divergence as dv
    from analysis.divergence.defaults import separating_signal

    store, _ = shipped
    frame = store.long_table(list(demo.DEMO_RUNS))
    ranking = dv.predictor_ranking(frame, "modarith_mc/acc,none", loss_metric="train/loss")
    routing = ("pathway_distance", "pathway_consistency", "routing_entropy", "expert_load")

    def within(signal: str) -> dict[str, float]:
        return dv.within_runs(frame, signal, "modarith_mc/acc,none", "train/loss")

    best, sentence = separating_signal(ranking, routing, "acc", "routing metrics", within)
    assert best == "pathway_consistency", sentence
    # It tells the two runs apart; within either run it does no better than the loss, and the page says so.
    assert "separates the runs" in sentence and "Within each run it does not beat the loss" in sentence, sentence
    flatness = ("hessian_trace", "hessian_top_eigenvalue", "fisher_trace", "sam_sharpness", "gradient_alignment")
    best, sentence = separating_signal(ranking, flatness, "acc", "flatness metrics")
    assert best is None and sentence.startswith("None of the flatness metrics"), sentence


def test_a_report_with_its_defaults_finds_what_the_divergence_page_finds(shipped):
    """A report goes to people who never open the page: it must not say "no window" where the page finds one."""
    from analysis import divergence as dv
    from analysis.report import ReportOptions, build_report
    from analysis.samples import score_items

    store, _ = shipped
    runs = list(demo.DEMO_RUNS)
    report = build_report(store, runs, ReportOptions())
    loss, score = report.options.loss_metric, report.options.downstream_metric
    assert (loss, score) == ("train/loss", "modarith_mc/acc,none")  # the page's defaults
    frame = store.long_table(runs)
    items = score_items(store, runs, score, frame)
    page = dv.divergence_windows(frame, loss, score, loss_tol=0.02, tol_of="range", samples=items)
    found = report.tables["windows"]
    assert len(found) == 1 and found[["run", "start", "end"]].equals(page[["run", "start", "end"]]), (found, page)
    with pytest.raises(ValueError, match="tol_of='relative'"):
        ReportOptions(tol_of="relative")
