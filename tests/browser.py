"""Start the real Streamlit server and drive it with Debian's Chromium through Playwright."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from tests.conftest import ROOT

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require_chromium() -> str:
    """Chromium's path; a missing browser fails the test loudly instead of skipping it."""
    path = shutil.which("chromium") or (CHROMIUM if Path(CHROMIUM).exists() else None)
    if path is None:
        raise RuntimeError("Debian's chromium is missing: `make system-deps` (or apt-get install -y chromium)")
    return path


@contextlib.contextmanager
def serve(cmd: list[str], port: int, timeout: float = 90.0) -> Iterator[subprocess.Popen]:
    """Run a server command from the project root until it listens on 127.0.0.1:``port``; stop it after."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"streamlit exited early:\n{proc.stdout.read()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            time.sleep(0.3)
        else:
            raise RuntimeError(f"streamlit did not listen on 127.0.0.1:{port} within {timeout:.0f} s")
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextlib.contextmanager
def streamlit_server(db: Path, timeout: float = 90.0) -> Iterator[str]:
    """Serve app.py on a free loopback port; yields the base URL."""
    port = free_port()
    cmd = [
        sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"),
        "--server.address", "127.0.0.1", "--server.port", str(port), "--server.headless", "true",
        "--server.fileWatcherType", "none", "--browser.gatherUsageStats", "false",
        "--", "--db", str(db),
    ]  # fmt: skip
    with serve(cmd, port, timeout):
        yield f"http://127.0.0.1:{port}"


@contextlib.contextmanager
def browser_page(width: int = 1400, height: int = 900):
    """A Playwright page in headless Debian Chromium (never a downloaded browser)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=require_chromium(), headless=True, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            yield page
        finally:
            browser.close()


def wait_for_chart(page, timeout_ms: int = 60_000) -> None:
    """Wait until a Plotly chart has drawn its SVG and Streamlit has stopped running."""
    page.wait_for_selector('[data-testid="stPlotlyChart"] .main-svg', timeout=timeout_ms)
    # Plotly fills in legend and axis texts after the SVG appears; wait for them too.
    page.wait_for_function(
        "() => !document.querySelector('[data-testid=\"stStatusWidget\"]') &&"
        " Array.from(document.querySelectorAll('[data-testid=stPlotlyChart] .legendtext'))"
        ".every(e => (e.textContent || '').length > 0)",
        timeout=timeout_ms,
    )
