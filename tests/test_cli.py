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


def test_add_run_twice_changes_nothing_and_a_touched_checkpoint_is_seen(trainer_run: Path, tmp_path: Path) -> None:
    run = shutil.copytree(trainer_run, tmp_path / "copy")
    db = tmp_path / "c.duckdb"
    assert cli("add-run", str(run), "--db", str(db))[0] == 0
    code, out, _ = cli("add-run", str(run), "--db", str(db))
    assert code == 0 and "0 new, 0 changed" in out
    save_tiny_checkpoint(run / "checkpoint-4", seed=7)  # new weights in place
    code, out, _ = cli("add-run", str(run), "--db", str(db))
    assert code == 0 and "0 new, 1 changed" in out


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
    assert list(table.columns) == ["run", "step", "tokens", "metric", "value", "stderr"]
    assert table.groupby("run").size().to_dict() == {"alpha": 120, "beta": 120}


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
