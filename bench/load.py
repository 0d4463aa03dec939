"""Load: several headless browsers reload dashboard pages while another process keeps writing results.

Every browser context is its own Streamlit session. Each loops over the pages for a bounded time:
open the page, wait until a chart or table is drawn and the script has finished, then look for a
Streamlit exception, an error box or a lock message. A writer process commits one result every
``--write-every`` seconds meanwhile (each write bumps the cache generation, so every page load
reads the file again). Prints page-load latency percentiles and every error; exits 1 on any error.

    python -m bench.load [--db data/cache.duckdb] [--sessions 4] [--seconds 120]

The cache is copied to a temporary folder first (the writer adds a ``load/counter`` metric to the
copy, never to your cache); without one, a small synthetic cache is built. Only 127.0.0.1 is
contacted: a request anywhere else counts as an error.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parent.parent
PAGES = ("/divergence", "/runs", "/compare")
RENDERED = '[data-testid="stPlotlyChart"] .main-svg, [data-testid="stDataFrame"]'
IDLE = "() => !document.querySelector('[data-testid=\"stStatusWidget\"]')"
# The bench also accepts a page that explains why it has nothing to draw (a cache without scores).
RENDERED_OR_NOTICE = RENDERED + ', [data-testid="stAlertContentWarning"], [data-testid="stAlertContentInfo"]'
FAILED = '[data-testid="stException"], [data-testid="stAlertContentError"]'
LOCK_TEXT = re.compile(r"\block(ed)?\b|conflicting lock", re.IGNORECASE)
LOCAL_HOSTS = {"127.0.0.1", "localhost"}

# Commits one result to the first checkpoint of the first run, every argv[3] seconds, for argv[2] seconds.
WRITER = """
import sys, time
sys.path.insert(0, sys.argv[4])
from analysis.store import ResultRow, Store
store = Store(sys.argv[1])
run = store.runs()["name"].iloc[0]
ckpt = store.checkpoints(run).iloc[0]
print("ready", flush=True)
deadline = time.monotonic() + float(sys.argv[2])
i = 0
while time.monotonic() < deadline:
    store.write_results([ResultRow(run, int(ckpt["step"]), "load/counter", float(i), ckpt["fingerprint"])])
    i += 1
    time.sleep(float(sys.argv[3]))
print(i, flush=True)
"""


@dataclass
class LoadReport:
    """What the sessions saw: one latency per good page load, one line per error."""

    latencies: list[float] = field(default_factory=list)
    by_page: dict[str, list[float]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    loads_per_session: list[int] = field(default_factory=list)
    writes: int = 0

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")

    def summary(self) -> str:
        lat = self.latencies
        median = statistics.median(lat) if lat else float("nan")
        pages = ", ".join(f"{path} {statistics.median(times):.2f} s" for path, times in sorted(self.by_page.items()))
        return (
            f"{len(self.loads_per_session)} sessions, {len(lat)} good page loads {self.loads_per_session}, "
            f"{len(self.errors)} errors, {self.writes} writes committed meanwhile; page latency "
            f"median {median:.2f} s, p90 {self.percentile(0.9):.2f} s, max {max(lat, default=float('nan')):.2f} s "
            f"(median by page: {pages})"
        )


async def _session(browser, base: str, pages: tuple[str, ...], deadline: float, index: int, timeout_s: float, report,
                   rendered: str):  # fmt: skip
    context = await browser.new_context(viewport={"width": 1280, "height": 860})
    page = await context.new_page()

    def check_host(request) -> None:
        host = urlparse(request.url).hostname
        if request.url.startswith(("http:", "https:", "ws:", "wss:")) and host not in LOCAL_HOSTS:
            report.errors.append(f"session {index}: request to {request.url}")

    page.on("request", check_host)
    loads = 0
    step = index  # sessions start on different pages
    try:
        while time.monotonic() < deadline:
            path = pages[step % len(pages)]
            step += 1
            start = time.perf_counter()
            try:
                await page.goto(base + path, wait_until="domcontentloaded", timeout=timeout_s * 1000)
                await page.wait_for_selector(rendered, timeout=timeout_s * 1000)
                await page.wait_for_function(IDLE, timeout=timeout_s * 1000)
            except Exception as err:  # Playwright's TimeoutError or a navigation error: a blank page
                report.errors.append(f"session {index} {path}: nothing rendered ({str(err).splitlines()[0]})")
                continue
            latency = time.perf_counter() - start
            failed = await page.query_selector_all(FAILED)
            text = await page.inner_text("body")
            if failed:
                shown = (await failed[0].inner_text()).strip().splitlines()
                report.errors.append(f"session {index} {path}: error shown: {shown[0] if shown else '?'}")
            elif LOCK_TEXT.search(text):
                report.errors.append(f"session {index} {path}: lock message: {LOCK_TEXT.search(text).group(0)}")
            else:
                report.latencies.append(latency)
                report.by_page.setdefault(path, []).append(latency)
                loads += 1
    finally:
        report.loads_per_session.append(loads)
        await context.close()


async def _drive(base: str, sessions: int, seconds: float, pages: tuple[str, ...], timeout_s: float, report,
                 rendered: str) -> None:  # fmt: skip
    from playwright.async_api import async_playwright

    from tests.browser import CHROMIUM_FLAGS, require_chromium

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=require_chromium(), headless=True, args=CHROMIUM_FLAGS)
        try:
            # Warm-up, untimed: the server's first run of each page imports its modules.
            warm = await browser.new_page()
            for path in pages:
                try:
                    await warm.goto(base + path, wait_until="domcontentloaded", timeout=timeout_s * 1000)
                    await warm.wait_for_selector(rendered, timeout=timeout_s * 1000)
                    await warm.wait_for_function(IDLE, timeout=timeout_s * 1000)
                except Exception as err:  # Playwright's TimeoutError: reported, and the timed part still runs
                    report.errors.append(f"warm-up {path}: nothing rendered ({str(err).splitlines()[0]})")
            await warm.close()
            deadline = time.monotonic() + seconds
            await asyncio.gather(
                *(_session(browser, base, pages, deadline, i, timeout_s, report, rendered) for i in range(sessions))
            )
        finally:
            await browser.close()


def run_load(
    db: Path,
    *,
    sessions: int = 4,
    seconds: float = 30.0,
    pages: tuple[str, ...] = PAGES,
    write_every: float | None = 0.05,
    timeout_s: float = 60.0,
    rendered: str = RENDERED,
) -> LoadReport:
    """Serve ``db`` with the real app, write to it from another process (unless ``write_every`` is None),
    and load pages from ``sessions`` browsers."""
    from tests.browser import streamlit_server

    report = LoadReport()
    with streamlit_server(db) as base:
        if write_every is None:
            asyncio.run(_drive(base, sessions, seconds, pages, timeout_s, report, rendered))
            return report
        writer = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(db), str(seconds + 5), str(write_every), str(ROOT)],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            if writer.stdout.readline().strip() != "ready":
                raise RuntimeError("the writer process did not start")
            asyncio.run(_drive(base, sessions, seconds, pages, timeout_s, report, rendered))
        finally:
            out, _ = writer.communicate(timeout=seconds + 60)
        if writer.returncode != 0:
            report.errors.append(f"writer exited with {writer.returncode}")
        report.writes = int(out.strip() or 0)
    return report


def synthetic_cache(path: Path) -> Path:
    """Two runs with the same loss curve, one of which gains downstream late (the demo's story, no weights)."""
    import numpy as np
    import pandas as pd

    from analysis.runs.base import Checkpoint, Run
    from analysis.store import ResultRow, Store

    store = Store(path)
    steps = [1, 10, 20, 40, 60, 80, 100, 120]
    for name, gain in (("grok", 0.8), ("stuck", 0.0)):
        log_steps = np.arange(1, 121)
        log = pd.DataFrame({"step": log_steps, "tokens": log_steps * 512, "metric": "train/loss",
                            "value": 2.0 * np.exp(-log_steps / 5.0) + 0.5})  # fmt: skip
        ckpts = [Checkpoint(s, f"/runs/{name}/step_{s}", s * 512, f"fp-{name}-{s}") for s in steps]
        store.register_run(Run(name, f"/runs/{name}", ckpts, log))
        scores = {s: 0.1 + gain * min(1.0, max(0.0, (s - 40) / 60)) for s in steps}
        rows = [ResultRow(name, s, "toy/acc,none", v, f"fp-{name}-{s}", 0.02, 400) for s, v in scores.items()]
        store.write_results(rows)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.splitlines()[0])
    parser.add_argument("--db", type=Path, default=ROOT / "data" / "cache.duckdb", help="cache to copy and serve")
    parser.add_argument("--sessions", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--write-every", type=float, default=0.05, help="seconds between the writer's commits")
    parser.add_argument("--baseline-seconds", type=float, default=30.0, help="one browser, no writer, first")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cdd-load-") as scratch:
        db = Path(scratch) / "cache.duckdb"
        if args.db.exists():
            shutil.copy2(args.db, db)
            source = str(args.db)
        else:
            synthetic_cache(db)
            source = "a synthetic cache (no cache at --db)"
        print(f"load: pages {', '.join(PAGES)} served from a copy of {source}")
        lenient = RENDERED_OR_NOTICE
        baseline = run_load(db, sessions=1, seconds=args.baseline_seconds, write_every=None, rendered=lenient)
        print(f"baseline (1 browser, no writer): {baseline.summary()}")
        report = run_load(
            db, sessions=args.sessions, seconds=args.seconds, write_every=args.write_every, rendered=lenient
        )
        print(f"load ({args.sessions} browsers, a writer every {args.write_every} s): {report.summary()}")
    for error in baseline.errors + report.errors:
        print(f"error: {error}")
    if baseline.latencies and report.latencies:
        ratio = statistics.median(report.latencies) / statistics.median(baseline.latencies)
        print(f"median page latency under load / baseline = {ratio:.2f}x")
    return 1 if baseline.errors or report.errors or not report.latencies else 0


if __name__ == "__main__":
    sys.exit(main())
