"""Cache faults through the real command line: a read-only cache file or folder, and a full disk.

Writes fail with one line that says what to do, reads keep working, and the file keeps exactly
what was committed before (and takes the same write once the fault is gone). File modes mean
nothing to root, so under root the commands run without the capabilities that bypass them
(CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER, dropped from the bounding set before exec); a
full disk is a file-size limit (RLIMIT_FSIZE, with SIGXFSZ ignored so writes fail with EFBIG),
which needs no privileges. SIGKILL of a worker mid-unit and mid-transaction is in test_jobs.py and
test_store.py.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from analysis.store import Store
from tests.conftest import ROOT, synthetic_run
from tests.test_bad_inputs import snapshot

# Slow: fills disks and locks files in subprocesses (`make test-fast` leaves it out).
pytestmark = pytest.mark.slow

# Linux capabilities that let root ignore file modes, and prctl's PR_CAPBSET_DROP.
FILE_MODE_CAPS = (1, 2, 3)  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER
PR_CAPBSET_DROP = 24

# Runs the CLI in a fresh process, optionally under a file-size limit.
CLI = """
import resource, signal, sys
limit = int(sys.argv[1])
if limit:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write with EFBIG instead of killing the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
from analysis.__main__ import main
sys.exit(main(sys.argv[2:]))
"""


def _drop_file_mode_caps() -> None:
    """In the child before exec: root keeps its uid but has to respect file modes like anyone else."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in FILE_MODE_CAPS:
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def run_cli(*args: str, fsize_limit: int = 0, unprivileged: bool = False) -> subprocess.CompletedProcess:
    """``python -m analysis ARGS`` in a new process; bound by file modes even as root when ``unprivileged``."""
    drop = unprivileged and os.geteuid() == 0
    return subprocess.run(
        [sys.executable, "-c", CLI, str(fsize_limit), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        preexec_fn=_drop_file_mode_caps if drop else None,
    )


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    return proc.stderr


def run_folder(parent: Path, log_rows: int = 50) -> Path:
    """A registrable run: one checkpoint folder (config + safetensors) and a CSV training log."""
    run = parent / "new run"
    (run / "step_10").mkdir(parents=True)
    (run / "step_10" / "config.json").write_text(json.dumps({"model_type": "olmoe"}))
    save_file({"w": torch.zeros(2, 2)}, str(run / "step_10" / "model.safetensors"))
    lines = "".join(f"{s},{1 / s},{2 / s},{3 / s}\n" for s in range(1, log_rows + 1))
    (run / "metrics.csv").write_text("step,loss,eval_loss,grad_norm\n" + lines)
    return run


def populated(path: Path) -> Path:
    store = Store(path)
    store.register_run(synthetic_run("alpha"))
    store.register_run(synthetic_run("beta", offset=0.4))
    return path


def test_read_only_cache_file_reads_and_refuses_writes_in_one_line(tmp_path: Path) -> None:
    db = populated(tmp_path / "cache.duckdb")
    run = run_folder(tmp_path)
    db.chmod(0o444)
    before = snapshot(db)

    reads = run_cli("query", "--run", "alpha", "--format", "csv", "--db", str(db), unprivileged=True)
    assert reads.returncode == 0, reads.stderr
    assert len(reads.stdout.splitlines()) == 1 + 120 and reads.stderr == ""

    err = one_error_line(run_cli("add-run", str(run), "--db", str(db), unprivileged=True))
    assert str(db) in err and "permission denied" in err and "make the file and its folder writable" in err
    assert snapshot(db) == before


def test_read_only_cache_folder_refuses_writes_and_keeps_the_file(tmp_path: Path) -> None:
    folder = tmp_path / "cache"
    folder.mkdir()
    db = populated(folder / "cache.duckdb")
    run = run_folder(tmp_path)
    folder.chmod(0o555)  # the file could be written, but its folder takes no .wal file
    before = snapshot(db)

    err = one_error_line(run_cli("add-run", str(run), "--db", str(db), unprivileged=True))
    assert str(db) in err and "cannot write the cache" in err and "make the file and its folder writable" in err
    assert sorted(p.name for p in folder.iterdir()) == ["cache.duckdb"]
    assert snapshot(db) == before
    reads = run_cli("runs", "--db", str(db), unprivileged=True)
    assert reads.returncode == 0 and "alpha" in reads.stdout and "beta" in reads.stdout
    folder.chmod(0o755)  # so that pytest can clean up


def test_full_disk_fails_the_write_in_one_line_and_the_cache_survives(tmp_path: Path) -> None:
    db = populated(tmp_path / "cache.duckdb")
    run = run_folder(tmp_path, log_rows=40_000)  # 120,000 log values: several MB in the cache
    before = snapshot(db)
    limit = db.stat().st_size + 256 * 1024

    err = one_error_line(run_cli("add-run", str(run), "--db", str(db), fsize_limit=limit))
    assert str(db) in err and "cannot write the cache" in err and "free disk space" in err
    assert db.stat().st_size <= limit
    assert snapshot(db) == before  # everything committed before is there, nothing of the failed write

    # Room again: the same command succeeds on the same file.
    again = run_cli("add-run", str(run), "--db", str(db))
    assert again.returncode == 0, again.stderr
    assert len(Store(db).log_series("new run")) == 120_000
    assert Store(db).runs()["name"].tolist() == ["alpha", "beta", "new run"]
