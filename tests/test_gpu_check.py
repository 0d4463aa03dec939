"""Running on a device: the tests' --device option, and bench/gpu_check.sh in its CPU dry run."""

from __future__ import annotations

import subprocess
import sys

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
