"""Writing one unit's results to the cache: one bulk statement against one INSERT per row.

Both sides write the same rows, in one transaction, to their own fresh copy of the same cache,
in this process. The baseline is the row-by-row loop ``Store.write_results`` used to run.

    python -m bench.store_write [--rows 2000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from analysis.store import ResultRow, Store
from bench.common import median_time, report


def _fresh_store(folder: Path, name: str) -> tuple[Store, list[tuple[str, int, str]]]:
    from analysis.runs.base import Checkpoint, Run

    store = Store(folder / f"{name}.duckdb")
    checkpoints = [Checkpoint(step=s, path=f"/ckpt/{s}", fingerprint=f"fp{s}") for s in range(0, 200, 10)]
    store.register_run(Run(name="bench", source="/ckpt", checkpoints=checkpoints))
    return store, [("bench", c.step, c.fingerprint) for c in checkpoints]


def _rows(keys: list[tuple[str, int, str]], n: int, salt: int) -> list[ResultRow]:
    return [
        ResultRow(run, step, f"task{i % 97}/acc", float(i + salt), fp, stderr=0.01, n=100, params={"shots": i % 3})
        for i in range(n)
        for run, step, fp in [keys[i % len(keys)]]
    ]


def _row_by_row(store: Store, rows: list[ResultRow]) -> None:
    with store.transaction() as con:
        for r in rows:
            con.execute(
                """INSERT OR REPLACE INTO results (run, step, metric, params_hash, fingerprint, value, stderr, n,
                   params, code_version, lib_versions, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, now())""",
                [r.run, r.step, r.metric, r.params_hash, r.fingerprint, r.value, r.stderr, r.n,
                 json.dumps(r.params, sort_keys=True), r.code_version, json.dumps(r.lib_versions, sort_keys=True)],
            )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        ours_store, keys = _fresh_store(Path(tmp), "ours")
        base_store, _ = _fresh_store(Path(tmp), "baseline")
        salt = iter(range(10**6))
        ours = median_time(lambda: ours_store.write_results(_rows(keys, args.rows, next(salt))), args.repeats)
        base = median_time(lambda: _row_by_row(base_store, _rows(keys, args.rows, next(salt))), args.repeats)
        a = ours_store.results("bench").sort_values(["step", "metric", "params_hash"])["value"].tolist()
        b = base_store.results("bench").sort_values(["step", "metric", "params_hash"])["value"].tolist()
        assert len(a) == len(b) > 0, "both sides must hold the same keys"
        report(f"store_write ({args.rows} rows)", ours, base, "one transaction each; median")


if __name__ == "__main__":
    main()
