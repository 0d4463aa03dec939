"""The shared sidebar: the list of pages, the page setup, and the run and x-axis selection every page reads."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypedDict

import streamlit as st

from analysis.charts import ChartStyle, run_colors
from analysis.flops import flops_axis
from pages._cache import _RUN_GENERATION, _parameter_counts, db_path, generation, guarded, runs_table
from pages._markdown import md_text
from pages._status import work_under_way

# Every view: (script, title, icon, URL path). app.py builds the navigation from this list.
PAGES = [
    ("pages/divergence.py", "Divergence", ":material/call_split:", "divergence"),
    ("pages/overview.py", "Overview", ":material/grid_view:", "overview"),
    ("pages/compare.py", "Compare runs", ":material/compare_arrows:", "compare"),
    ("pages/forecast.py", "Forecast", ":material/trending_up:", "forecast"),
    ("pages/geometry.py", "Geometry", ":material/landscape:", "geometry"),
    ("pages/finetune.py", "Fine-tune", ":material/tune:", "finetune"),
    ("pages/pathways.py", "Pathways", ":material/alt_route:", "pathways"),
    ("pages/samples.py", "Samples", ":material/checklist:", "samples"),
    ("pages/report.py", "Report", ":material/description:", "report"),
    ("pages/runs.py", "Runs", ":material/folder_open:", "runs"),
    ("pages/evaluate.py", "Evaluate", ":material/play_arrow:", "evaluate"),
    ("pages/jobs.py", "Jobs", ":material/pending:", "jobs"),
]


class PageConfig(TypedDict):
    """The arguments of ``st.set_page_config`` that every entry point passes."""

    page_title: str
    page_icon: str
    layout: Literal["centered", "wide"]


# An emoji favicon is drawn in the page (a data: URL); a :material/...: one is fetched from fonts.gstatic.com.
PAGE_CONFIG: PageConfig = {"page_title": "Checkpoint divergence", "page_icon": "📉", "layout": "wide"}


@dataclass(frozen=True)
class Selection:
    """The sidebar's choices, shared by every page (and kept in the URL)."""

    db: Path
    runs: tuple[str, ...]
    x: str  # "step", "tokens" or "flops" (only when every selected run has FLOPs)
    style: ChartStyle
    colors: dict[str, str]


def _x_axis(runs: tuple[str, ...], wanted: str) -> str:
    """The x-axis to draw: ``wanted``, except FLOPs for runs that lack them (said in one line, then tokens/step)."""
    if wanted != "flops" or not runs:
        return wanted
    db = str(db_path())
    known = guarded(lambda: _parameter_counts(db, generation(), tuple(sorted(runs))))
    x, note = flops_axis(
        {r: n for r, (n, _, _) in known.items()},
        {r: has for r, (_, _, has) in known.items()},
        {r: why for r, (_, why, _) in known.items()},
    )
    if note:
        st.caption(md_text(note))
    return x


_SELECT_NEXT = "_select_run_next"


def select_run_next(run: str) -> None:
    """Add ``run`` to the sidebar's selection on the next rerun (a widget's value cannot change after it is drawn)."""
    st.session_state[_SELECT_NEXT] = run


def sidebar() -> None:
    """Draw the shared sidebar and remember the selection for the pages."""
    table = runs_table()
    names = list(table["name"]) if len(table) else []
    default: list[str] | None = names[:4]
    if (pending := st.session_state.pop(_SELECT_NEXT, None)) in names:
        st.session_state["runs"] = list(dict.fromkeys([*st.session_state.get("runs", default), pending]))
        default = None  # the value comes from the session state: a default as well would be ignored
    with st.sidebar:
        for script, title, icon, _ in PAGES:
            st.page_link(script, label=title, icon=icon)
        st.divider()
        st.caption(f"cache: `{db_path()}`")
        chosen = st.multiselect(
            "Runs", names, default=default, key="runs", bind="query-params", placeholder="pick runs"
        )
        # No format_func: a bound radio writes its shown label into the URL, and links say x=flops.
        x = st.radio(
            "x-axis", ["step", "tokens", "flops"], horizontal=True, key="x", bind="query-params",
            help="flops: 6 × parameters × tokens seen (the active parameters of a mixture of experts)",
        )  # fmt: skip
        x = _x_axis(tuple(chosen), x)
        large = st.toggle("Large fonts (projector)", key="large", bind="query-params")
    st.session_state["_selection"] = Selection(
        db=db_path(),
        runs=tuple(chosen),
        x=x,
        style=ChartStyle(large=large, height=520 if large else 420),
        colors=run_colors(names),
    )


def selection() -> Selection:
    """The sidebar's choices (drawn by app.py before the page runs); every page's first line.

    It also draws the status line of work under way at the top of the page (:func:`work_under_way`).
    """
    if _RUN_GENERATION.get() is None or "_selection" not in st.session_state:
        # The page runs without app.py: Streamlit serves a deep link (/divergence?...) straight from the
        # pages/ folder, and reruns it the same way after every widget change. Give it the page setup and
        # sidebar on every run, not only the first, or the sidebar is gone after the first click.
        st.set_page_config(**PAGE_CONFIG)
        sidebar()
    work_under_way()
    return st.session_state["_selection"]


def chosen() -> Selection:
    """The sidebar's choices, for a page that already called :func:`selection` in this run (via signal_view).

    A second ``selection()`` would draw the sidebar and the status line twice on a page opened by a link.
    """
    return st.session_state["_selection"]


def require_runs(sel: Selection) -> None:
    """Stop the page with what to do when no run is selected (or none is registered at all)."""
    if not sel.runs:
        no_runs_message() if not len(runs_table()) else st.info("Pick runs in the sidebar.")
        st.stop()


def no_runs_message() -> None:
    st.info(
        "No runs in this cache yet. Build the embedded demo with `python -m analysis demo`, "
        "or register your own checkpoints with `python -m analysis add-run PATH`."
    )
