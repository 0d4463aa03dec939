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
from analysis.logs import configured, job_log, job_log_tail, tail, worker_log_path
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


@pytest.mark.slow
def test_a_worker_writes_a_log_file_with_each_units_start_and_finish(queued: tuple[Store, int]) -> None:
    store, job = queued
    code, out, err = cli("worker", "--once", "--poll", "0.1", "--db", str(store.path))
    assert code == 0 and "ran 1 job(s)" in out
    path = worker_log_path(store.path, os.getpid())
    assert path == store.path.parent / "logs" / f"cache-worker-{os.getpid()}.log"
    text = path.read_text()
    for step in STEPS:
        assert f"INFO analysis.jobs.runner: job {job} step {step}: started, computing heldout:probe.jsonl" in text
        assert f"INFO analysis.jobs.runner: job {job} step {step}: finished in" in text
        assert text.index(f"job {job} step {step}: started") < text.index(f"job {job} step {step}: finished")
    assert f"job {job}: {len(STEPS)} checkpoints, {len(STEPS)} computed, 0 already cached, 0 failed" in text
    assert "DEBUG" not in text  # the default level is info
    assert f"job {job} step {STEPS[0]}: started" in err  # the same lines on stderr
    # What the Jobs page shows: the worker's lines about this job, from its file.
    where, lines = job_log(store.path, job, store.job_units(job))
    assert where == str(store.path.parent / "logs" / "cache-worker-*.log")
    assert len(lines) >= 2 * len(STEPS) and all(f"job {job}" in line for line in lines)


@pytest.mark.slow
def test_log_level_error_keeps_a_worker_quiet(queued: tuple[Store, int]) -> None:
    store, _ = queued
    code, _, err = cli("worker", "--once", "--db", str(store.path), "--log-level", "ERROR")
    assert code == 0 and err == ""
    assert worker_log_path(store.path, os.getpid()).read_text() == ""
    assert store.jobs()["status"].tolist() == ["done"]


@pytest.mark.slow
def test_log_level_debug_adds_the_progress_notes(queued: tuple[Store, int]) -> None:
    store, job = queued
    assert cli("worker", "--once", "--db", str(store.path), "--log-level", "debug")[0] == 0
    text = worker_log_path(store.path, os.getpid()).read_text()
    assert f"DEBUG analysis.jobs.runner: job {job} step {STEPS[0]}: heldout:probe.jsonl (0/1 items done)" in text


@pytest.mark.slow
def test_a_failing_checkpoint_is_logged_as_a_warning_with_its_reason(queued: tuple[Store, int]) -> None:
    store, job = queued
    shutil.rmtree(store.checkpoints("run")["path"].iloc[0])  # step 2's folder is gone
    assert cli("worker", "--once", "--db", str(store.path))[0] == 0
    lines = job_log_tail(store.path, job)
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


def test_the_tail_reads_every_workers_files_in_time_order_and_only_the_job_asked_for(tmp_path: Path) -> None:
    db = tmp_path / "cache.duckdb"
    first, second = worker_log_path(db, 41), worker_log_path(db, 42)
    first.parent.mkdir()

    def write(path: Path, minute: int, steps: range, mtime: float) -> None:
        lines = [f"2026-12-01 10:{minute:02d}:{k:02d} INFO x: job 7 step {k}: started" for k in steps]
        lines += [f"2026-12-01 10:{minute:02d}:00 INFO x: job 17 step 1: started"]  # "job 1" must not match it
        path.write_text("\n".join(lines) + "\n")
        os.utime(path, (mtime, mtime))

    # Worker 41 rotated once (its .1 copy is older) and died; worker 42 resumed the job.
    write(first.with_name(first.name + ".1"), 1, range(0, 40), 1000)
    write(first, 2, range(0, 30), 2000)
    write(second, 3, range(0, 20), 3000)
    write(tmp_path / "logs" / "other-worker-41.log", 4, range(0, 50), 4000)  # another cache in the folder
    got = job_log_tail(db, 7)
    assert len(got) == 50
    assert got[-1].startswith("2026-12-01 10:03:19") and got[0].startswith("2026-12-01 10:02:00")
    assert [line[:16] for line in got] == ["2026-12-01 10:02"] * 30 + ["2026-12-01 10:03"] * 20
    assert job_log_tail(db, 1) == [] and job_log_tail(tmp_path / "none.duckdb", 7) == []


def log_sources(at) -> list[str]:
    """The captions saying where a shown log comes from, markdown escapes removed."""
    return [c.value.replace("\\", "") for c in at.caption if c.value.startswith("from ")]


@pytest.mark.slow
def test_the_jobs_page_shows_a_jobs_log_tail_from_the_worker_file_or_the_stored_messages(
    queued: tuple[Store, int], monkeypatch
) -> None:
    from tests.test_app import open_app

    store, job = queued
    shutil.rmtree(store.checkpoints("run")["path"].iloc[0])  # step 2 fails, step 4 finishes
    assert cli("worker", "--once", "--db", str(store.path))[0] == 0
    at = open_app(store.path, monkeypatch, page="pages/jobs.py")
    assert not at.exception and not at.get("code")  # the log is shown on demand
    at.toggle(key=f"log-{job}").set_value(True).run()
    [code] = at.get("code")
    lines = code.proto.code_text.splitlines()
    assert lines == job_log_tail(store.path, job)
    assert any(f"WARNING analysis.jobs.runner: job {job} step 2: failed:" in line for line in lines)
    assert any(f"job {job} step 4: finished" in line for line in lines)
    where = str(store.path.parent / "logs" / "cache-worker-*.log")
    assert f"from {where}" in log_sources(at)

    # Without the worker's file (a job run by eval, or on another machine): the messages stored in the cache.
    shutil.rmtree(worker_log_path(store.path, os.getpid()).parent)
    at.run()
    [code] = at.get("code")
    stored = code.proto.code_text.splitlines()
    reason = store.job_units(job).set_index("unit").loc["2", "message"]
    assert stored[0] == f"step 2 [failed]: {reason}" and stored[1].startswith("step 4 [done]: ")
    assert log_sources(at) == ["from messages stored in the cache"]


@pytest.mark.slow
def test_a_worker_process_logs_its_file_path_and_an_empty_queue(tmp_path: Path) -> None:
    """Through ``python -m analysis``, where the command line's module is ``__main__``."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    db = tmp_path / "cache.duckdb"
    Store(db).migrate()
    proc = subprocess.run(
        [sys.executable, "-m", "analysis", "worker", "--once", "--db", str(db)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0 and proc.stdout == "ran 0 job(s)\n", proc.stderr
    [path] = (tmp_path / "logs").glob("cache-worker-*.log")
    text = path.read_text()
    assert f"INFO analysis.__main__: worker log: {path}" in text and "queue empty; 0 job(s) run" in text
    assert text.splitlines() == proc.stderr.splitlines()  # the same lines on stderr and in the file
