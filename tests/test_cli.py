"""The command line on real folders: a real HF Trainer run, broken folders, the query output."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pandas as pd
import pytest

from analysis.__main__ import main
from tests.conftest import ROOT
from tests.factories import make_trainer_output, save_tiny_checkpoint


def cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def trainer_run(tmp_path_factory) -> Path:
    return make_trainer_output(tmp_path_factory.mktemp("trainer") / "my run", steps=(2, 4, 6))


@pytest.mark.slow
def test_add_run_registers_a_real_trainer_output(trainer_run: Path, db: Path) -> None:
    code, out, err = cli("add-run", str(trainer_run), "--db", str(db))
    assert code == 0, err
    assert "registered run 'my run': 3 checkpoints (steps 2..6)" in out
    code, out, _ = cli("runs", "--db", str(db))
    assert code == 0 and "my run" in out

    code, out, _ = cli("query", "--run", "my run", "--format", "json", "--db", str(db))
    assert code == 0
    table = pd.DataFrame(json.loads(out))
    logged = table[table["metric"] == "train/loss"].set_index("step")["value"]
    # The latest checkpoint's trainer_state.json holds the whole history.
    state = json.loads((trainer_run / "checkpoint-6" / "trainer_state.json").read_text())
    expected = {e["step"]: e["loss"] for e in state["log_history"] if "loss" in e}
    assert len(expected) == 6
    assert logged.to_dict() == expected  # exact: no float rounding on the way


@pytest.mark.slow
def test_add_run_twice_changes_nothing_and_a_touched_checkpoint_is_seen(trainer_run: Path, tmp_path: Path) -> None:
    run = shutil.copytree(trainer_run, tmp_path / "copy")
    db = tmp_path / "c.duckdb"
    assert cli("add-run", str(run), "--db", str(db))[0] == 0
    code, out, _ = cli("add-run", str(run), "--db", str(db))
    assert code == 0 and "0 new, 0 changed" in out
    save_tiny_checkpoint(run / "checkpoint-4", seed=7)  # new weights in place
    code, out, _ = cli("add-run", str(run), "--db", str(db))
    assert code == 0 and "0 new, 1 changed" in out


@pytest.mark.slow
def test_checkpoint_without_config_is_reported_and_the_rest_registered(trainer_run: Path, tmp_path: Path) -> None:
    run = shutil.copytree(trainer_run, tmp_path / "partial")
    (run / "checkpoint-2" / "config.json").unlink()
    code, out, err = cli("add-run", str(run), "--db", str(tmp_path / "c.duckdb"))
    assert code == 0
    assert "checkpoint-2" in err and "config.json" in err
    assert "2 checkpoints (steps 4..6)" in out


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        (lambda p: p, "no such folder"),
        (lambda p: (p.mkdir(), p)[1], "no checkpoints"),
    ],
    ids=["missing", "empty"],
)
def test_unusable_folders_give_one_line_and_nonzero_exit(tmp_path: Path, setup, expected: str) -> None:
    folder = setup(tmp_path / "run")
    code, _, err = cli("add-run", str(folder), "--db", str(tmp_path / "c.duckdb"))
    assert code != 0
    assert err.startswith("error: ") and err.count("\n") == 1
    assert expected in err
    assert not (tmp_path / "c.duckdb").exists()  # nothing written


@pytest.mark.slow
def test_unreadable_explicit_log_is_an_error(trainer_run: Path, tmp_path: Path) -> None:
    bad = tmp_path / "log.csv"
    bad.write_text("not,a\nlog,file\n")
    code, _, err = cli("add-run", str(trainer_run), "--log", str(bad), "--db", str(tmp_path / "c.duckdb"))
    assert code == 2 and str(bad) in err and err.count("\n") == 1


def test_query_unknown_run_names_the_known_ones(populated_db: Path) -> None:
    code, _, err = cli("query", "--run", "gamma", "--db", str(populated_db))
    assert code == 2
    assert "unknown run 'gamma'" in err and "alpha, beta" in err


def test_query_csv_is_the_long_table(populated_db: Path) -> None:
    code, out, _ = cli("query", "--run", "alpha", "--run", "beta", "--format", "csv", "--db", str(populated_db))
    assert code == 0
    table = pd.read_csv(io.StringIO(out))
    assert list(table.columns) == ["run", "step", "tokens", "metric", "value", "stderr", "setting"]
    assert table.groupby("run").size().to_dict() == {"alpha": 120, "beta": 120}
    assert table["setting"].isna().all()  # one setting per metric: nothing to tell apart


def test_query_tells_the_settings_of_a_metric_apart(populated_db: Path) -> None:
    from analysis.store import ResultRow, Store

    rows = [
        ResultRow("alpha", s, "piqa/acc,none", v, f"fp-alpha-{s}", 0.01, 100, {"task": "piqa", "num_fewshot": shots})
        for shots, values in ((0, {10: 0.5, 30: 0.6}), (5, {10: 0.55}))
        for s, v in values.items()
    ]
    Store(populated_db).write_results(rows)
    code, out, _ = cli("query", "--run", "alpha", "--format", "json", "--db", str(populated_db))
    assert code == 0
    table = pd.DataFrame(json.loads(out))
    piqa = table[table["metric"] == "piqa/acc,none"]
    got = sorted(zip(piqa["setting"], piqa["step"], piqa["value"], strict=True))
    assert got == [("0-shot", 10, 0.5), ("0-shot", 30, 0.6), ("5-shot", 10, 0.55)]
    assert set(table.loc[table["metric"] == "train/loss", "setting"]) == {""}
    code, out, _ = cli("query", "--run", "alpha", "--db", str(populated_db))
    assert code == 0 and out.splitlines()[0].split()[-1] == "setting" and out.count("5-shot") == 1


def test_import_evals_keeps_the_declared_direction_and_the_shot_count(tmp_path: Path, populated_db: Path) -> None:
    from analysis.store import Store

    data = {
        "results": {"wikitext": {"word_perplexity,none": 31.5, "acc,none": 0.4}},
        "higher_is_better": {"wikitext": {"word_perplexity": False, "acc": True}},
        "n-shot": {"wikitext": 5},
        "config": {"model_args": "pretrained=/m,revision=step10"},
    }
    path = tmp_path / "results.json"
    path.write_text(json.dumps(data))
    code, _, err = cli("import-evals", str(path), "--run", "alpha", "--db", str(populated_db))
    assert code == 0, err
    table = Store(populated_db).long_table("alpha").set_index("metric")
    directions = table.loc[["wikitext/word_perplexity,none", "wikitext/acc,none"], "higher_is_better"]
    assert directions.tolist() == [False, True]  # not None: the file's declaration is stored
    assert json.loads(table.loc["wikitext/acc,none", "params"])["num_fewshot"] == 5


def test_real_process_prints_no_traceback_on_bad_input(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "analysis", "add-run", str(tmp_path / "nope"), "--db", str(tmp_path / "c.duckdb")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1


def test_windows_prints_each_window_with_its_adjusted_p_value(divergence_db: Path) -> None:
    args = ("--run", "grok", "--run", "stuck", "--score", "toy/acc,none", "--db", str(divergence_db))
    code, out, err = cli("windows", *args, "--format", "json")
    assert code == 0, err
    rows = json.loads(out)
    assert [(r["run"], r["kind"]) for r in rows] == [("grok", "grokking")]  # the flat run claims nothing
    w = rows[0]
    assert w["start"] >= 40 and w["end"] <= 120 and w["p_adjusted"] <= 0.05
    assert w["change_lo"] > 0 and w["change_lo"] <= w["downstream_change"] <= w["change_hi"]
    code, out, _ = cli("windows", *args, "--format", "csv", "--alpha", "0.01")
    assert code == 0 and out.splitlines()[0].startswith(
        "run,kind,start,end,downstream_change,change_lo,change_hi,p_adjusted"
    )
    code, _, err = cli("windows", *args, "--alpha", "2")
    assert code == 2 and err.count("\n") == 1 and "alpha" in err


def test_rank_prints_the_ranking_and_says_whether_anything_beats_the_loss(divergence_db: Path) -> None:
    code, out, err = cli(
        "rank", "--run", "grok", "--run", "stuck", "--score", "toy/acc,none", "--db", str(divergence_db)
    )
    assert code == 0, err
    assert "train/loss" in out and "(pooled)" in out
    assert "No signal shares enough checkpoints" in out or "better than train/loss" in out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--run", "nope", "--score", "toy/acc,none"), "unknown run 'nope'"),
        (("--run", "grok", "--score", "nope"), "metric 'nope' not in the data"),
        (("--run", "grok", "--score", "toy/acc,none", "--setting", "oops"), "write METRIC=SETTING"),
        (("--run", "grok", "--score", "toy/acc,none", "--setting", "toy/acc,none=9-shot"), "no setting '9-shot'"),
    ],
)
def test_windows_and_rank_refuse_bad_input_in_one_line(divergence_db: Path, extra, message) -> None:
    for command in ("windows", "rank"):
        code, out, err = cli(command, *extra, "--db", str(divergence_db))
        assert code == 2 and out == "" and message in err and err.count("\n") == 1, (command, err)


def test_windows_pair_the_items_a_score_was_computed_from(divergence_db: Path) -> None:
    """Per-item results stored beside a score make the window test paired (stderr_source 'paired')."""
    import numpy as np

    from analysis.samples import score_items
    from analysis.settings import select_settings
    from analysis.store import ResultRow, SampleRow, Store

    store = Store(divergence_db)
    rng = np.random.default_rng(0)
    steps = [1, 10, 20, 40, 60, 80, 100, 120]
    easy = rng.random(400) < 0.3  # items right from the start; 30% more are learnt from step 80
    learnt = rng.random(400) < 0.3
    rows, samples = [], []
    for s in steps:
        right = (easy | (learnt & (s >= 80))).astype(float)
        params = {"task": "items"}
        row = ResultRow("grok", s, "items/acc,none", float(right.mean()), f"fp-grok-{s}", 0.02, 400, params=params)
        rows.append(row)
        samples += [SampleRow("grok", s, row.metric, row.params_hash, str(i), v) for i, v in enumerate(right)]
    store.write_results(rows, samples)
    frame = select_settings(store.long_table(["grok"]))
    items = score_items(store, ["grok"], "items/acc,none", frame)
    assert items is not None and len(items) == 400 * len(steps)
    code, out, err = cli(
        "windows", "--run", "grok", "--score", "items/acc,none", "--db", str(divergence_db), "--format", "json"
    )
    assert code == 0, err
    found = json.loads(out)
    assert [w["stderr_source"] for w in found] == ["paired"]
    assert found[0]["start"] == 60 and found[0]["end"] == 80  # the step where the items were learnt


def test_forecast_on_an_imported_pythia_sweep_prints_each_hidden_checkpoint_with_its_interval(db: Path) -> None:
    sweep = ROOT / "tests" / "fixtures" / "pythia" / "70m"
    assert cli("import-evals", str(sweep), "--run", "p70", "--db", str(db))[0] == 0
    args = ("--run", "p70", "--score", "arc_easy/acc,none", "--db", str(db), "--fit-until", "33000")
    code, out, err = cli("forecast", *args, "--format", "json")
    assert code == 0, err
    rows = json.loads(out)
    assert [r["x"] for r in rows] == [43000, 53000, 63000, 73000, 83000, 93000, 103000, 113000, 123000, 133000, 143000]
    assert all(r["lo"] <= r["predicted"] <= r["hi"] and r["level"] == 0.9 for r in rows)
    assert all(r["measured"] is not None for r in rows) and rows[-1]["n_fit"] == 15  # steps 1..33000
    code, out, err = cli("forecast", *args, "--method", "two-step", "--format", "csv")
    assert code == 0, err  # through the run's loss: lambada's perplexity, the only loss an eval sweep has
    assert "two-step via lambada_openai/ppl,none" in out
    code, _, err = cli("forecast", *args, "--fit-until", "8", "--format", "csv")
    assert code == 2 and "fit on at least 5" in err and err.count("\n") == 1
