"""Page render time with a large cache: 2 runs x 200 checkpoints x 50 metrics.

Runs the Divergence page through Streamlit's AppTest on a real DuckDB file: the first render
(reads the cache) and a rerun (what a widget change costs; reads are cached by the store's write
generation). The baseline is one plain read of the same data from DuckDB (Store.long_table) in
the same process; the ratio says how much a rerun costs next to that read.

    python -m bench.render [--checkpoints 200] [--metrics 50]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from bench.common import median_time, report


def build_cache(path: Path, n_ckpts: int, n_metrics: int) -> None:
    from analysis.runs.base import Checkpoint, Run
    from analysis.store import ResultRow, Store

    store = Store(path)
    steps = np.unique(np.geomspace(10, 100_000, n_ckpts).astype(int))
    rng = np.random.default_rng(0)
    for run, offset in (("alpha", 0.0), ("beta", 0.3)):
        log_steps = np.arange(10, 100_001, 10)
        loss = 3.0 * log_steps**-0.2 + offset
        log = pd.DataFrame({"step": log_steps, "tokens": log_steps * 4096, "metric": "train/loss", "value": loss})
        ckpts = [Checkpoint(int(s), f"/runs/{run}/step_{s}", int(s) * 4096, f"fp-{run}-{s}") for s in steps]
        store.register_run(Run(run, f"/runs/{run}", ckpts, log))
        rows = []
        for m in range(n_metrics):
            name = f"task{m}/acc,none" if m < n_metrics // 2 else f"signal_{m}"
            values = np.tanh(np.log(steps) / 10 + m / n_metrics) + 0.01 * rng.standard_normal(len(steps))
            rows += [
                ResultRow(run, int(s), name, float(v), f"fp-{run}-{s}", stderr=0.01, n=500)
                for s, v in zip(steps, values, strict=True)
            ]
        store.write_results(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", type=int, default=200)
    parser.add_argument("--metrics", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    from streamlit.testing.v1 import AppTest

    from analysis.store import Store

    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "cache.duckdb"
        started = time.perf_counter()
        build_cache(db, args.checkpoints, args.metrics)
        n = len(Store(db).results(["alpha", "beta"]))
        print(f"cache: {n} results ({args.checkpoints} checkpoints x {args.metrics} metrics x 2 runs), "
              f"built in {time.perf_counter() - started:.1f} s")  # fmt: skip
        os.environ["CDD_DB"] = str(db)
        at = AppTest.from_file(str(Path(__file__).resolve().parent.parent / "app.py"), default_timeout=300)
        started = time.perf_counter()
        at.run()
        first = time.perf_counter() - started
        assert not at.exception, at.exception
        print(f"first render (reads the cache, ranks predictors): {first:.2f} s")
        rerun = median_time(lambda: at.run(), repeats=args.repeats, warmup=1)
        baseline = median_time(lambda: Store(db).long_table(["alpha", "beta"]), repeats=args.repeats, warmup=1)
        report("divergence page rerun", rerun, baseline, "baseline: one uncached read of the same rows from DuckDB")
        print(f"rerun median {rerun * 1000:.0f} ms (target: well under 1 s)")


if __name__ == "__main__":
    main()
