"""A new user driving the real server in Debian's Chromium: adding a run, watching a job land, projector fonts."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from analysis.store import ResultRow, Store, UnitUpdate
from tests.browser import browser_page, streamlit_server, wait_for_chart
from tests.conftest import OUT
from tests.factories import save_tiny_checkpoint

pytestmark = pytest.mark.browser


def wait_for_text(page, text: str, timeout_s: float = 60.0, present: bool = True) -> None:
    """Poll the page body until ``text`` is (or is no longer) in it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (text in page.inner_text("body")) == present:
            return
        time.sleep(0.5)
    raise AssertionError(f"{text!r} {'never appeared' if present else 'never went away'} within {timeout_s:.0f} s")


def test_a_run_added_in_the_browser_appears_in_the_sidebar_without_a_restart(populated_db: Path, tmp_path: Path):
    OUT.mkdir(parents=True, exist_ok=True)
    run = tmp_path / "fresh-run"
    shutil.copytree(save_tiny_checkpoint(tmp_path / "ckpt"), run / "step_10")
    shutil.copytree(run / "step_10", run / "step_20")
    with streamlit_server(populated_db) as url, browser_page() as page:
        page.goto(f"{url}/runs", wait_until="domcontentloaded")
        wait_for_chart(page)
        page.get_by_text("Add a run").click()
        page.get_by_label("Run folder or hf://org/model").fill("/no/such/run")
        page.get_by_role("button", name="Add run").click()
        wait_for_text(page, "no such folder")
        assert "Traceback" not in page.inner_text("body")
        page.get_by_label("Run folder or hf://org/model").fill(str(run))
        page.get_by_role("button", name="Add run").click()
        wait_for_text(page, "registered run 'fresh-run': 2 checkpoints (steps 10..20)")
        page.screenshot(path=str(OUT / "browser_add_run.png"))
        chosen = page.locator('[data-testid="stSidebar"] [data-testid="stMultiSelect"]').inner_text()
        assert "fresh-run" in chosen and "alpha" in chosen  # picked beside the runs already chosen
    assert set(Store(populated_db).runs()["name"]) == {"alpha", "beta", "fresh-run"}


def test_the_page_follows_a_running_job_as_checkpoints_land(divergence_db: Path) -> None:
    worker = subprocess.Popen(["sleep", "300"])  # stands in for a live worker: only its pid is checked
    store = Store(divergence_db)
    job = store.create_job("stuck", {"run": "stuck", "tasks": ["toy"]}, [("100", 1), ("120", 1)])
    store.set_job(job, "running", worker_pid=worker.pid)
    link = "/divergence?runs=stuck&loss=train%2Floss&score=toy%2Facc%2Cnone&logx=false"
    try:
        with streamlit_server(divergence_db) as url, browser_page() as page:
            page.goto(url + link, wait_until="domcontentloaded")
            wait_for_chart(page)
            wait_for_text(page, "Job 1 running · run stuck · toy · 0/2 units")
            # The worker writes a checkpoint's result and marks it done; nobody touches the browser.
            fp = store.checkpoints("stuck").set_index("step").loc[120, "fingerprint"]
            store.write_results([ResultRow("stuck", 120, "toy/acc,none", 0.99, fp, stderr=0.001, n=1000)])
            store.set_unit(UnitUpdate(job, "120", "done", 1, 1))
            wait_for_text(page, "1/2 units", timeout_s=30)
            last = "() => { const d = document.querySelector('.js-plotly-plot')._fullData;"
            last += " const t = d.find(t => t.name === 'stuck' && t.yaxis === 'y2'); return t.y[t.y.length - 1]; }"
            deadline = time.monotonic() + 30
            while page.evaluate(last) != pytest.approx(0.99) and time.monotonic() < deadline:
                time.sleep(0.5)
            assert page.evaluate(last) == pytest.approx(0.99)  # the new checkpoint is on the chart
            store.set_job(job, "done")
            wait_for_text(page, "units", present=False, timeout_s=30)  # the status line goes with the job
    finally:
        worker.kill()
        worker.wait()


def test_projector_fonts_at_1280x720_are_large_and_the_title_clears_the_legend(divergence_db: Path) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    link = "/divergence?loss=train%2Floss&score=toy%2Facc%2Cnone&large=true"
    with streamlit_server(divergence_db) as url, browser_page(1280, 720) as page:
        page.goto(url + link, wait_until="domcontentloaded")
        wait_for_chart(page)
        sizes = page.evaluate(
            """() => { const p = document.querySelector('[data-testid=stPlotlyChart]');
                const px = s => parseFloat(getComputedStyle(p.querySelector(s)).fontSize);
                return {legend: px('.legendtext'), tick: px('.ytick text'), ytitle: px('.ytitle'),
                        title: px('.gtitle')}; }"""
        )
        assert sizes["legend"] >= 20 and sizes["ytitle"] >= 20 and sizes["tick"] >= 18 and sizes["title"] >= 22
        boxes = page.evaluate(
            """() => { const p = document.querySelector('[data-testid=stPlotlyChart]');
                const box = s => { const r = p.querySelector(s).getBoundingClientRect(); return [r.top, r.bottom]; };
                return {title: box('.gtitle'), legend: box('.legend'), plot: box('.gridlayer')}; }"""
        )
        assert boxes["title"][1] <= boxes["plot"][0] <= boxes["plot"][1] <= boxes["legend"][0]
        page.screenshot(path=str(OUT / "browser_projector_divergence.png"))
