"""The first minute of a new user: from an empty cache to every page showing the demo, in under 60 s.

What `make run` does once the requirements are installed: `python -m analysis demo` (imports the shipped
results), then the Streamlit server; here a real Chromium then opens every page that shows demo data and
waits for its chart. The clock runs from the import to the last page drawn; each page is screenshot to
out/tests/first_minute/ to be looked at.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.browser import browser_page, streamlit_server, wait_for_chart
from tests.conftest import OUT, ROOT

pytestmark = pytest.mark.browser

BUDGET_S = 60.0
# The pages a user lands on for each demo story; each must draw its chart from the demo's data alone.
DEMO_PAGES = ["divergence", "overview", "compare", "forecast", "finetune", "geometry", "pathways", "samples", "runs"]
# What a page says when its data is missing: none of it may show on the demo.
EMPTY_SIGNS = ("no runs", "yet:", "evaluate some checkpoints", "Traceback", "has no ")


def test_every_page_shows_the_demo_within_a_minute_of_a_fresh_start(tmp_path: Path) -> None:
    shots = OUT / "first_minute"
    shots.mkdir(parents=True, exist_ok=True)
    db = tmp_path / "cache.duckdb"
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "analysis", "demo", "--db", str(db), "--root", str(tmp_path / "demo")],
        cwd=ROOT, capture_output=True, text=True, timeout=BUDGET_S,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    imported = time.monotonic() - start
    drawn: dict[str, float] = {}
    with streamlit_server(db) as url, browser_page(1280, 720) as page:
        for name in DEMO_PAGES:
            page.goto(f"{url}/{name}", wait_until="domcontentloaded")
            wait_for_chart(page)
            text = page.inner_text("section.main") if page.query_selector("section.main") else page.inner_text("body")
            for sign in EMPTY_SIGNS:
                assert sign.lower() not in text.lower(), f"/{name} says {sign!r}: its demo data is missing"
            drawn[name] = time.monotonic() - start
            page.screenshot(path=str(shots / f"{name}.png"), full_page=True)
    total = max(drawn.values())
    print(f"import {imported:.1f} s; pages drawn by " + ", ".join(f"{k} {v:.0f} s" for k, v in drawn.items()))
    assert total <= BUDGET_S, f"the demo took {total:.0f} s to show on every page (budget {BUDGET_S:.0f} s)"
