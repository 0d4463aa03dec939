"""Work side by side in child processes, each reporting its progress through a shared counter.

The demo trains its runs, and the rebuild evaluates them, one child process per run: small models
use cores poorly within one process, so two one-thread children finish in about half the time of
two two-thread runs in a row.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any


def side_by_side(
    children: Sequence[tuple[str, Callable[..., Any], tuple]],
    workers: int,
    *,
    progress: Callable[[int], None] | None = None,
    what: str = "demo run",
) -> None:
    """Run each ``(name, target, args)`` as ``target(*args, counter)`` in a spawned child, ``workers`` at a time.

    ``counter`` is a shared integer the child raises as it goes (steps trained, units evaluated);
    ``progress(total)`` gets the sum over all children started so far, polled twice a second. A child
    that exits with an error stops the others and raises one line naming it (its traceback is above,
    on the child's stderr). ``target`` must be importable (a module-level function).
    """
    import multiprocessing as mp
    import time

    ctx = mp.get_context("spawn")  # a clean interpreter: no inherited torch thread pools
    pending = list(children)
    running: list[tuple[Any, Any, str]] = []
    counters: list[Any] = []
    while pending or running:
        while pending and len(running) < max(1, workers):
            name, target, args = pending.pop(0)
            counter = ctx.Value("i", 0)
            child = ctx.Process(target=target, args=(*args, counter))
            child.start()
            running.append((child, counter, name))
            counters.append(counter)
        for entry in list(running):
            proc, _, name = entry
            if not proc.is_alive():
                proc.join()
                if proc.exitcode != 0:
                    for other, _, _ in running:
                        other.terminate()
                    raise RuntimeError(f"{what} {name!r} failed (exit code {proc.exitcode}); see the output above")
                running.remove(entry)
        if progress is not None:
            progress(sum(c.value for c in counters))
        time.sleep(0.5)
