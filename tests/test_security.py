"""Security: loopback by default, trust_remote_code visible per run, nothing from a run rendered as HTML.

The browser test serves a cache whose run names, sources, checkpoint paths, metric names and job
messages are HTML and markdown payloads, in real Chromium, with the server started the way
``streamlit run app.py`` starts it (no --server.address: .streamlit/config.toml decides).
"""

from __future__ import annotations

import contextlib
import sys
import tomllib
from pathlib import Path

import pandas as pd
import pytest

from analysis.runs.base import Checkpoint, Run
from analysis.store import Store
from tests.browser import browser_page, free_port, serve, wait_for_chart
from tests.conftest import ROOT
from tests.test_app import open_app

SCRIPT = "<script>window.__xss = 1</script>"
IMG = '<img src=x onerror="window.__xss = 2">'
LINK = "[click me](javascript:window.__xss=3)"
REMOTE_IMAGE = "![beacon](http://198.51.100.7/beacon.png)"  # TEST-NET-2: must never be requested
PAYLOADS = (SCRIPT, IMG, LINK, REMOTE_IMAGE)


def test_the_server_binds_to_loopback_by_default() -> None:
    config = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    assert config["server"]["address"] == "127.0.0.1"
    makefile = (ROOT / "Makefile").read_text()
    assert "HOST   ?= 127.0.0.1" in makefile and "--server.address $(HOST)" in makefile


def test_runs_page_shows_trust_remote_code_per_run(db: Path, monkeypatch) -> None:
    store = Store(db)
    log = pd.DataFrame({"step": [1, 2], "tokens": [None, None], "metric": "train/loss", "value": [2.0, 1.0]})
    store.register_run(Run("plain", "/runs/plain", [Checkpoint(1, "/runs/plain/step_1", None, "a")], log))
    trusted = Run("custom-code", "/runs/cc", [Checkpoint(1, "/runs/cc/step_1", None, "b")], log)
    store.register_run(trusted, trust_remote_code=True)
    at = open_app(db, monkeypatch)
    assert not at.exception
    table = at.dataframe[0].value.set_index("name")
    assert table["trust_remote_code"].to_dict() == {"custom-code": True, "plain": False}
    [warning] = at.warning
    assert "execute their checkpoints' own Python code" in warning.value
    assert "custom-code" in [t.value for t in at.text] and "plain" not in " ".join(t.value for t in at.text)


def hostile_cache(db: Path) -> Path:
    store = Store(db)
    steps = list(range(1, 31))
    for i, payload in enumerate(PAYLOADS):
        log = pd.DataFrame(
            {
                "step": steps,
                "tokens": [s * 10 for s in steps],
                "metric": f"train/{payload}",
                "value": [1 / s for s in steps],
            }
        )
        ckpts = [Checkpoint(s, f"/runs/{payload}/step_{s}", s * 10, f"fp{i}-{s}") for s in (10, 20, 30)]
        store.register_run(Run(payload, f"/runs/{payload}", ckpts, log, config={"model_type": payload}))
    job = store.create_job(SCRIPT, {"run": SCRIPT}, [("10", 1)])
    store.set_job(job, "failed", f"{IMG} {LINK} {REMOTE_IMAGE}")
    return db


@contextlib.contextmanager
def plain_streamlit(db: Path):
    """``streamlit run app.py`` with only a port given: the address comes from .streamlit/config.toml."""
    port = free_port()
    cmd = [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port), "--", "--db", str(db)]
    with serve(cmd, port):
        yield port


def listening_addresses(port: int) -> set[str]:
    """Local addresses of the TCP sockets listening on ``port`` (from /proc/net/tcp and tcp6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.add(address)
    return found


# What a successful injection would leave behind: a global set, a script, an image, a javascript: link.
HOSTILE_STATE = """() => ({
    xss: window.__xss === undefined ? null : window.__xss,
    scripts: Array.from(document.scripts).filter(s => s.textContent.includes('__xss')).length,
    imgs: Array.from(document.querySelectorAll('img[src="x"], img[src*="198.51.100.7"]')).map(e => e.outerHTML),
    links: document.querySelectorAll('a[href^="javascript"]').length,
    text: document.body.innerText,
})"""


@pytest.mark.browser
@pytest.mark.slow
def test_hostile_names_render_as_text_and_the_server_is_loopback_only(db: Path) -> None:
    hostile_cache(db)
    outside: list[str] = []
    with plain_streamlit(db) as port, browser_page() as page:
        # 0100007F is 127.0.0.1; anything else (00000000 = every interface) would be reachable from outside.
        assert listening_addresses(port) == {"0100007F"}
        page.on("request", lambda r: outside.append(r.url) if "127.0.0.1" not in r.url.split("/")[2] else None)
        for path in ("/runs", "/divergence", "/jobs"):
            page.goto(f"http://127.0.0.1:{port}{path}", wait_until="domcontentloaded")
            if path == "/runs":
                wait_for_chart(page)
            else:
                page.wait_for_selector('[data-testid="stMain"] h1', timeout=60_000)
                page.wait_for_function("() => !document.querySelector('[data-testid=\"stStatusWidget\"]')")
            page.wait_for_timeout(500)
            state = page.evaluate(HOSTILE_STATE)
            found = (state["xss"], state["scripts"], len(state["imgs"]), state["links"])
            assert found == (None, 0, 0, 0), (path, state["imgs"])
            if path == "/runs":  # the payloads are on the page, as text
                assert SCRIPT in state["text"] and IMG in state["text"]
            if path == "/jobs":
                assert IMG in state["text"]
    assert outside == []
