"""Running on a device: the tests' --device option, and bench/gpu_check.sh in its CPU dry run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, device_problem


def test_device_problem_accepts_the_cpu_and_names_what_is_wrong_otherwise() -> None:
    assert device_problem("cpu") is None
    assert device_problem("gpu") == "--device gpu: not a torch device; use cpu, cuda or cuda:N"
    assert device_problem("cuda:x") == "--device cuda:x: not a torch device; use cpu, cuda or cuda:N"
    assert device_problem("mps") == "--device mps: only cpu and cuda are supported by the device-aware tests"
    # No machine has 99 GPUs: whether torch has CUDA or not, the index is refused.
    problem = device_problem("cuda:99")
    assert problem is not None and problem.startswith("--device cuda:99: ") and "\n" not in problem


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: --device cuda is valid here")
def test_device_cuda_without_a_gpu_is_one_usage_error_not_a_run_of_skips() -> None:
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-m", "device", "--device", "cuda",
               "tests/test_metrics_pathways.py"]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert done.returncode == 4, lines  # pytest's usage error, not 0 (all skipped) or 5 (none collected)
    assert len(lines) == 1 and lines[0].startswith("ERROR: --device cuda: "), lines
    assert "passed" not in lines[0] and "skipped" not in lines[0]


# --- bench/gpu_check.sh -----------------------------------------------------------------------------------

SCRIPT = ROOT / "bench" / "gpu_check.sh"
STEPS = ["tests", "hvp", "mc_scoring", "checkpoint_cost", "pathways", "eigen"]


def _gpu_check(*args: str, out: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("OUT", None)  # --out or the default, never a folder left in the environment
    return subprocess.run(["bash", str(SCRIPT), *args, "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)  # fmt: skip


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--device", "gpu"], "gpu_check: --device gpu: use cuda, cuda:N or cpu (the CPU dry run)"),
        (["--budget", "3"], "gpu_check: --budget 3: give a whole number of seconds, at least 10"),
        (["--budget", "ten"], "gpu_check: --budget ten: give a whole number of seconds, at least 10"),
        (["--fast"], "gpu_check: unknown argument '--fast'; see bench/gpu_check.sh --help"),
    ],
)
def test_gpu_check_refuses_bad_arguments_in_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    done = _gpu_check(*args, out=tmp_path / "gpu", timeout=30)
    assert done.returncode == 64
    assert done.stderr.strip() == message and done.stdout == ""
    assert not (tmp_path / "gpu").exists()  # nothing ran


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the check would run")
def test_gpu_check_without_a_gpu_stops_with_one_line(tmp_path: Path) -> None:
    done = _gpu_check(out=tmp_path / "gpu", timeout=60)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: no GPU: "), lines
    report = (tmp_path / "gpu" / "gpu_report.md").read_text()
    assert report.startswith("# GPU check: not run") and lines[0] in report
    assert not list((tmp_path / "gpu" / "steps").iterdir())  # no step started


ROW = re.compile(r"^\| (\w+) \| (\d+) \| (passed|failed|timed out) \| ([\d.]+) \| (\d+) \| (steps/\S+\.log) \|$", re.M)


@pytest.mark.slow
def test_the_cpu_dry_run_reports_every_step_with_its_exit_code(tmp_path: Path) -> None:
    # The smallest budget gives each step 5 s: checkpoint_cost (ten fresh interpreters) cannot finish in that,
    # so the run must carry on past steps killed at their timeout and still report all six.
    out = tmp_path / "gpu"
    done = _gpu_check("--device", "cpu", "--quick", "--budget", "10", out=out, timeout=240)
    report = (out / "gpu_report.md").read_text()
    assert report.startswith("# GPU check: CPU dry run on cpu, quick (tiny sizes)")
    assert "## Versions" in report and f"torch {torch.__version__}" in report and "## nvidia-smi" in report
    rows = ROW.findall(report)
    assert [r[0] for r in rows] == STEPS, report
    codes = [int(r[1]) for r in rows]
    for name, code, result, wall, limit, log in rows:
        assert result == ("passed" if code == "0" else "timed out" if code in ("124", "137") else "failed")
        assert float(wall) <= int(limit) + 15, (name, wall, limit)  # the timeout held (10 s grace to kill)
        assert (out / log).is_file()
        assert f"### {name}: exit {code} ({result})" in report
    assert any(c in (124, 137) for c in codes), "no step reached its 5 s timeout: the bound was not exercised"
    passed = codes.count(0)
    assert f"{passed} of 6 steps passed." in report
    assert done.returncode == (0 if passed == 6 else 1)
    assert done.stderr.strip().splitlines()[-1].startswith(f"gpu_check: {passed} of 6 steps passed in ")
    assert (out / "raw").is_dir()
