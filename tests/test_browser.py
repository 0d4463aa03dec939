"""The real server in real headless Chromium: a deep link opens the chart it names."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.browser import browser_page, streamlit_server, wait_for_chart
from tests.conftest import OUT

pytestmark = pytest.mark.browser


def test_deep_link_renders_the_runs_chart(populated_db: Path) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    shot = OUT / "browser_runs.png"
    with streamlit_server(populated_db) as url, browser_page() as page:
        page.goto(f"{url}/runs?runs=beta&logx=false", wait_until="domcontentloaded")
        wait_for_chart(page)
        legend = page.evaluate(
            "() => Array.from(document.querySelectorAll('[data-testid=stPlotlyChart] .legendtext'))"
            ".map(e => e.textContent)"
        )
        assert legend == ["beta"]
        xtitle = page.evaluate("() => document.querySelector('[data-testid=stPlotlyChart] .xtitle').textContent")
        assert xtitle == "step"
        # Changing a widget writes the URL, so the view can be shared as a link.
        assert "runs=beta" in page.url
        page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
