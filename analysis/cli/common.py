"""What every command shares: progress bars on stderr, printing a frame, registering a loaded run, comma lists."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from analysis.store import Store

if TYPE_CHECKING:
    import pandas as pd


def progress_bar(desc: str, unit: str = "step") -> Callable[[int, int], None]:
    """A callback(done, total) that drives one tqdm bar on stderr, counting ``unit``."""
    from tqdm import tqdm

    bar: dict = {}

    def update(done: int, total: int) -> None:
        if bar.get("closed"):
            return
        if "bar" not in bar:
            bar["bar"] = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True)
        b = bar["bar"]
        b.total = total
        b.n = done
        b.refresh()
        if done >= total:
            b.close()
            bar["closed"] = True

    return update


def register_loaded_run(store: Store, run, *, trust_remote_code: bool = False) -> int:
    """Register a loaded run, print what happened; return the exit code."""
    for problem in run.problems:
        print(f"warning: {problem}", file=sys.stderr)
    if not run.checkpoints and not len(run.log):
        print(f"error: {run.source}: no checkpoints and no training log found; nothing registered", file=sys.stderr)
        return 1
    from analysis.runs.add import AddResult

    report = store.register_run(run, trust_remote_code=trust_remote_code)
    print(AddResult(report, tuple(c.step for c in run.checkpoints)).summary())
    return 0


def print_frame(frame: pd.DataFrame, fmt: str) -> None:
    """Print ``frame`` to stdout as CSV, JSON records or an aligned table (``fmt``: csv, json, table)."""
    if fmt == "csv":
        frame.to_csv(sys.stdout, index=False)
    elif fmt == "json":
        # Through Python floats, not DataFrame.to_json, which rounds to 10 significant digits.
        records = frame.astype(object).where(frame.notna(), None).to_dict(orient="records")
        json.dump(records, sys.stdout, default=lambda v: v.item() if hasattr(v, "item") else str(v))
        print()
    else:
        print(frame.to_string(index=False) if len(frame) else "(no rows)")


def unit_bar() -> Callable:
    """A progress(unit, n_units, name, done, total, what) callback drawing one tqdm bar over units."""
    from tqdm import tqdm

    state: dict = {}

    def update(unit: int, n_units: int, name: str, done: int, total: int, what: str) -> None:
        if "bar" not in state:
            state["bar"] = tqdm(total=n_units, desc="checkpoints", unit="ckpt", file=sys.stderr, dynamic_ncols=True)
        bar = state["bar"]
        bar.n = unit
        bar.set_postfix_str(f"step {name}: {what} ({done}/{total})")
        if unit >= n_units:
            bar.close()
            state.clear()

    return update


def comma_list(text: str) -> list[str]:
    """The non-empty, stripped parts of a comma-separated flag value (``--steps 60,300``)."""
    return [part.strip() for part in text.split(",") if part.strip()]
