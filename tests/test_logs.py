"""Logging: a worker's log file with each unit's start and finish, --log-level, the tail the Jobs page shows."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from analysis.__main__ import main
from analysis.jobs import JobSpec, submit
from analysis.logs import BACKUPS, configured, job_log, job_log_tail, tail, worker_log_path
from analysis.runs.load import load_run
from analysis.store import Store
from tests.factories import save_tiny_checkpoint, sum_texts

STEPS = (2, 4)


def cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def queued(tmp_path: Path) -> tuple[Store, int]:
    """A cache with a two-checkpoint run and one queued held-out-loss job (the cheapest evaluation)."""
    for i, step in enumerate(STEPS):
        save_tiny_checkpoint(tmp_path / "run" / f"step_{step}", seed=i)
    probe = tmp_path / "probe.jsonl"
    probe.write_text("".join(json.dumps({"text": t}) + "\n" for t in sum_texts(4)))
    store = Store(tmp_path / "cache" / "cache.duckdb")
    store.register_run(load_run(tmp_path / "run"))
    job = submit(store, JobSpec(run="run", metrics=("heldout_loss",), data=str(probe), device="cpu"))
    return store, job


def test_a_worker_writes_a_log_file_with_each_units_start_and_finish(queued: tuple[Store, int]) -> None:
    store, job = queued
    code, out, err = cli("worker", "--once", "--poll", "0.1", "--db", str(store.path))
    assert code == 0 and "ran 1 job(s)" in out
    path = worker_log_path(store.path, os.getpid())
    assert path == store.path.parent / "logs" / f"worker-{os.getpid()}.log"
    text = path.read_text()
    for step in STEPS:
        assert f"INFO analysis.jobs.runner: job {job} step {step}: started, computing heldout:probe.jsonl" in text
        assert f"INFO analysis.jobs.runner: job {job} step {step}: finished in" in text
        assert text.index(f"job {job} step {step}: started") < text.index(f"job {job} step {step}: finished")
    assert f"job {job}: {len(STEPS)} checkpoints, {len(STEPS)} computed, 0 already cached, 0 failed" in text
    assert "DEBUG" not in text  # the default level is info
    assert f"job {job} step {STEPS[0]}: started" in err  # the same lines on stderr
    # What the Jobs page shows: the worker's lines about this job, from its file.
    where, lines = job_log(store.path, job, os.getpid(), store.job_units(job))
    assert where == str(path) and len(lines) >= 2 * len(STEPS) and all(f"job {job}" in line for line in lines)


def test_log_level_error_keeps_a_worker_quiet(queued: tuple[Store, int]) -> None:
    store, _ = queued
    code, _, err = cli("worker", "--once", "--db", str(store.path), "--log-level", "ERROR")
    assert code == 0 and err == ""
    assert worker_log_path(store.path, os.getpid()).read_text() == ""
    assert store.jobs()["status"].tolist() == ["done"]


def test_log_level_debug_adds_the_progress_notes(queued: tuple[Store, int]) -> None:
    store, job = queued
    assert cli("worker", "--once", "--db", str(store.path), "--log-level", "debug")[0] == 0
    text = worker_log_path(store.path, os.getpid()).read_text()
    assert f"DEBUG analysis.jobs.runner: job {job} step {STEPS[0]}: heldout:probe.jsonl (0/1 items done)" in text


def test_a_failing_checkpoint_is_logged_as_a_warning_with_its_reason(queued: tuple[Store, int]) -> None:
    store, job = queued
    shutil.rmtree(store.checkpoints("run")["path"].iloc[0])  # step 2's folder is gone
    assert cli("worker", "--once", "--db", str(store.path))[0] == 0
    lines = job_log_tail(store.path, job, os.getpid())
    [failed] = [line for line in lines if "WARNING" in line]
    assert f"job {job} step {STEPS[0]}: failed:" in failed and "step_2" in failed
    assert any(f"job {job} step {STEPS[1]}: finished" in line for line in lines)


@pytest.mark.parametrize("level", ["bad", "", "verbose"])
def test_a_bad_log_level_is_one_line_and_exit_2(tmp_path: Path, level: str) -> None:
    code, out, err = cli("worker", "--once", "--db", str(tmp_path / "c.duckdb"), "--log-level", level)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith(f"error: --log-level {level!r}: use one of debug, info"), err
    assert not (tmp_path / "logs").exists()  # refused before anything was opened


def test_configured_removes_its_handlers_so_commands_never_stack_them(tmp_path: Path) -> None:
    logger = logging.getLogger("analysis.jobs.runner")
    root = logging.getLogger("analysis")
    before = list(root.handlers)
    for i in range(3):
        with configured("info", tmp_path / "w.log"):
            logger.info("line %d", i)
    assert root.handlers == before
    assert [line.split(": ", 1)[1] for line in tail(tmp_path / "w.log")] == ["line 0", "line 1", "line 2"]


def test_the_tail_reads_rotated_files_in_order_and_keeps_only_the_job_asked_for(tmp_path: Path) -> None:
    db = tmp_path / "cache.duckdb"
    path = worker_log_path(db, 4242)
    path.parent.mkdir()
    # Oldest in the highest-numbered rotated file, as RotatingFileHandler leaves them.
    for i, name in enumerate([f"{path.name}.{BACKUPS}", f"{path.name}.1", path.name]):
        lines = [f"t INFO x: job 7 step {i * 100 + k}: started" for k in range(40)]
        lines += [f"t INFO x: job 17 step {k}: started" for k in range(5)]  # another job: "job 1" must not match it
        (path.parent / name).write_text("\n".join(lines) + "\n")
    got = job_log_tail(db, 7, 4242)
    assert len(got) == 50 and got[-1].endswith("job 7 step 239: started") and got[0].endswith("job 7 step 130: started")
    assert job_log_tail(db, 1, 4242) == [] and job_log_tail(db, 7, None) == [] and job_log_tail(db, 7, 1) == []
