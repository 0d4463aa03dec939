"""Small helpers shared by the benchmarks."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from analysis.models import DTYPES  # the dtype names a bench's --dtype takes, as jobs name them

__all__ = ["DTYPES", "describe_device", "median_time", "report", "sync"]


def sync(device: torch.device | str) -> None:
    """Wait for the device's queued kernels: CUDA calls return before the work is done, so a timing needs it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def describe_device(device: torch.device | str) -> str:
    """The device in words for a bench's header: "cpu", or "cuda (NVIDIA H200, CUDA 12.8)"."""
    device = torch.device(device)
    if device.type != "cuda":
        return str(device)
    return f"{device} ({torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda})"


def median_time(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn`` over ``repeats`` calls, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def report(name: str, ours: float, baseline: float, what: str) -> None:
    print(
        f"{name}: ours {ours:.3f} s, baseline {baseline:.3f} s, ratio baseline/ours = {baseline / ours:.2f}x ({what})"
    )
