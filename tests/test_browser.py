"""The real server in real headless Chromium: a deep link opens the chart it names."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.browser import browser_page, streamlit_server, wait_for_chart
from tests.conftest import OUT

# Slow: drives the app in Chromium (`make test-fast` leaves it out).
pytestmark = [pytest.mark.browser, pytest.mark.slow]


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


def test_deep_link_to_divergence_opens_that_view(divergence_db: Path) -> None:
    """A link pasted into a meeting chat: run, metrics, smoothing and axis come from the URL."""
    OUT.mkdir(parents=True, exist_ok=True)
    shot = OUT / "browser_divergence.png"
    link = "/divergence?runs=grok&loss=train%2Floss&score=toy%2Facc%2Cnone&logx=false&large=true"
    with streamlit_server(divergence_db) as url, browser_page() as page:
        page.goto(url + link, wait_until="domcontentloaded")
        wait_for_chart(page)
        page.wait_for_function(
            "() => document.querySelectorAll('[data-testid=stPlotlyChart] .main-svg').length >= 2", timeout=60_000
        )
        legends = page.evaluate(
            "() => Array.from(document.querySelectorAll('[data-testid=stPlotlyChart]')[0]"
            ".querySelectorAll('.legendtext')).map(e => e.textContent)"
        )
        assert "grok" in legends and "stuck" not in legends
        # The planted window is shaded and labelled on the chart, and listed in the table.
        text = page.inner_text("body")
        assert "Divergence" in text and "grokking" in text
        assert "Traceback" not in text and "Error" not in text
        xaxis = page.evaluate("() => document.querySelector('[data-testid=stPlotlyChart] .xtitle').textContent")
        assert "log" not in xaxis  # logx=false from the link
        page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
