"""What every page shares: the cache path, the sidebar selection, and cached reads.

The only module with Streamlit cache decorators. Reads are keyed by the store's write
generation, so a page shows new results as soon as a job commits them, and never holds the
database file open (DuckDB lets no other process open it meanwhile).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypedDict

import pandas as pd
import streamlit as st

from analysis import activity
from analysis.charts import ChartStyle, run_colors
from analysis.flops import add_flops_column, flops_axis, store_parameter_counts
from analysis.settings import select_settings, settings_table
from analysis.store import DEFAULT_DB, Store, StoreLockedError

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


def db_path() -> Path:
    """The cache file: ``-- --db PATH`` after ``streamlit run app.py``, else $CDD_DB, else the default."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--db", default=os.environ.get("CDD_DB", str(DEFAULT_DB)))
    args, _ = parser.parse_known_args(sys.argv[1:])
    return Path(args.db)


@dataclass(frozen=True)
class Selection:
    """The sidebar's choices, shared by every page (and kept in the URL)."""

    db: Path
    runs: tuple[str, ...]
    x: str  # "step", "tokens" or "flops" (only when every selected run has FLOPs)
    style: ChartStyle
    colors: dict[str, str]


def _store() -> Store:
    return Store(db_path(), lock_timeout=10.0)


# The generation read by this script run, in a one-item list; None outside app.py's per-run block. A context
# variable, not session state: after st.stop() every st call raises again, so a `finally` that touched session
# state never cleared it, and later fragment ticks and page runs kept the stopped run's generation.
_RUN_GENERATION: ContextVar[list[int | None] | None] = ContextVar("_run_generation", default=None)


@contextmanager
def one_generation_per_run() -> Iterator[None]:
    """Within this block (app.py wraps each script run in it) the write generation is read once.

    Every cached read of the run is then keyed by the same generation, so a page never mixes two
    states of the cache, and the file is opened once for it rather than once per read (~50 ms each).
    """
    token = _RUN_GENERATION.set([None])
    try:
        yield
    finally:
        _RUN_GENERATION.reset(token)


def generation() -> int:
    """The cache's write generation: the key of every cached read."""
    held = _RUN_GENERATION.get()
    if held is not None and held[0] is not None:
        return held[0]
    gen = guarded(lambda: _store().generation())
    if held is not None:
        held[0] = gen
    return gen


@st.cache_data(max_entries=32, show_spinner=False)
def _runs(db: str, gen: int) -> pd.DataFrame:
    return Store(db, lock_timeout=10.0).runs()


@st.cache_data(max_entries=64, show_spinner=False)
def _checkpoints(db: str, gen: int, run: str) -> pd.DataFrame:
    return Store(db, lock_timeout=10.0).checkpoints(run)


@st.cache_data(max_entries=64, show_spinner=False)
def _log_series(db: str, gen: int, runs: tuple[str, ...]) -> pd.DataFrame:
    return _with_flops(db, gen, runs, Store(db, lock_timeout=10.0).log_series(list(runs)))


@st.cache_data(max_entries=32, show_spinner=False)
def _parameter_counts(db: str, gen: int, runs: tuple[str, ...]) -> dict[str, tuple[int | None, str, bool]]:
    # Reads one safetensors header per run (no weights): cheap, but not on every rerun.
    return store_parameter_counts(Store(db, lock_timeout=10.0), runs)


def _with_flops(db: str, gen: int, runs: tuple[str, ...], frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with a ``flops`` column (NaN for runs without a model size or tokens), for the FLOPs x-axis."""
    return add_flops_column(frame, {run: n for run, (n, _, _) in _parameter_counts(db, gen, runs).items()})


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


def guarded(fn, *args):
    """Call a read; on a cache problem show one clear error and stop the page."""
    try:
        return fn(*args)
    except (ValueError, StoreLockedError) as err:
        st.error(str(err))
        st.stop()


def runs_table() -> pd.DataFrame:
    db = str(db_path())
    return guarded(lambda: _runs(db, generation()))


def checkpoints(run: str) -> pd.DataFrame:
    db = str(db_path())
    return guarded(lambda: _checkpoints(db, generation(), run))


def log_series(runs: tuple[str, ...]) -> pd.DataFrame:
    db = str(db_path())
    return guarded(lambda: _log_series(db, generation(), tuple(sorted(runs))))


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


def metric_names(frame: pd.DataFrame) -> list[str]:
    """The metrics present in a long table, sorted."""
    return sorted(frame["metric"].unique()) if len(frame) else []


def no_runs_message() -> None:
    st.info(
        "No runs in this cache yet. Build the embedded demo with `python -m analysis demo`, "
        "or register your own checkpoints with `python -m analysis add-run PATH`."
    )


@st.cache_data(max_entries=16, show_spinner=False)
def _jobs(db: str, gen: int) -> pd.DataFrame:
    return Store(db, lock_timeout=10.0).jobs()


@st.cache_data(max_entries=64, show_spinner=False)
def _job_units(db: str, gen: int, job_id: int) -> pd.DataFrame:
    return Store(db, lock_timeout=10.0).job_units(job_id)


def jobs() -> pd.DataFrame:
    db = str(db_path())
    return guarded(lambda: _jobs(db, generation()))


def job_units(job_id: int) -> pd.DataFrame:
    db = str(db_path())
    return guarded(lambda: _job_units(db, generation(), job_id))


def store() -> Store:
    """A store handle for the few writes a page makes (queueing and cancelling jobs)."""
    return _store()


REFRESH_SECONDS = 2.0
_PROGRESS_SEEN = "_progress_seen"


@st.cache_data(max_entries=8, show_spinner=False)
def _open_jobs(db: str, gen: int) -> pd.DataFrame:
    return activity.active_jobs(Store(db, lock_timeout=10.0).jobs())


def _active_now(fresh: bool = False) -> tuple[pd.DataFrame, dict[int, bool]]:
    """Queued and running jobs, and whether each running one's worker process is alive.

    ``fresh``: read the write generation now rather than the page run's (a fragment tick between runs).
    """
    db = str(db_path())
    gen = guarded(lambda: _store().generation()) if fresh else generation()
    active = guarded(lambda: _open_jobs(db, gen))
    running = active[active["status"] == "running"] if len(active) else active
    if not len(running):
        return active, {}
    from analysis.jobs.runner import process_alive  # imports torch: only once a job runs

    return active, {int(j.id): process_alive(j.worker_pid) for j in running.itertuples()}


def work_under_way() -> None:
    """Above every page (``selection`` calls it): a status line per queued or running job, linked to the Jobs page.

    While something can still change, the line redraws every few seconds and the whole page reruns when a
    checkpoint lands or a job starts or ends, so its charts show the new results. With no job queued or
    running nothing is drawn and nothing polls.
    """
    active, alive = _active_now()
    st.session_state[_PROGRESS_SEEN] = activity.progress_key(active)
    if not len(active):
        return
    if activity.live(active, alive):
        _live_status()
    else:
        _status(active, alive)


@st.fragment(run_every=REFRESH_SECONDS)
def _live_status() -> None:
    active, alive = _active_now(fresh=True)
    if activity.progress_key(active) != st.session_state.get(_PROGRESS_SEEN):
        st.rerun(scope="app")  # a checkpoint landed, or a job started or ended: redraw the page's charts
    _status(active, alive)


def _status(active: pd.DataFrame, alive: dict[int, bool]) -> None:
    text, link = st.columns([9, 1], vertical_alignment="center")
    for job in active.itertuples():
        text.caption(":material/pending: " + md_text(activity.status_line(job, alive.get(int(job.id)))))
    link.page_link("pages/jobs.py", label="Jobs", icon=":material/pending:")


# A page's choice of setting per metric (metric -> label), sorted, so it can key a cached read.
Chosen = tuple[tuple[str, str], ...]


def _chosen(chosen: Mapping[str, str] | None) -> Chosen:
    return tuple(sorted((chosen or {}).items()))


@st.cache_data(max_entries=16, show_spinner=False)
def _long_table(db: str, gen: int, runs: tuple[str, ...]) -> pd.DataFrame:
    return Store(db, lock_timeout=10.0).long_table(list(runs))


@st.cache_data(max_entries=32, show_spinner=False)
def _selected(db: str, gen: int, runs: tuple[str, ...], chosen: Chosen) -> pd.DataFrame:
    return _with_flops(db, gen, runs, select_settings(_long_table(db, gen, runs), dict(chosen)))


@st.cache_data(max_entries=16, show_spinner=False)
def _settings(db: str, gen: int, runs: tuple[str, ...]) -> pd.DataFrame:
    return settings_table(_long_table(db, gen, runs))


def long_table(runs: tuple[str, ...], chosen: Mapping[str, str] | None = None) -> pd.DataFrame:
    """Logged series and computed results of ``runs`` (run, step, tokens, metric, value, stderr, ...).

    One setting per metric (``analysis.settings.select_settings``): the one ``chosen`` names (metric ->
    label), else the one with the most checkpoints. Values of different settings are never mixed.
    """
    db = str(db_path())
    return guarded(lambda: _selected(db, generation(), tuple(sorted(runs)), _chosen(chosen)))


def setting_picker(runs: tuple[str, ...], metrics: list[str | None]) -> dict[str, str]:
    """A URL-bound selectbox per metric of ``metrics`` cached under several settings; returns metric -> label.

    Each defaults to the setting with the most checkpoints; a one-line caption says what is cached.
    """
    db = str(db_path())
    table = guarded(lambda: _settings(db, generation(), tuple(sorted(runs))))
    several = [(m, table[table["metric"] == m]) for m in dict.fromkeys(m for m in metrics if m)]
    several = [(m, rows) for m, rows in several if len(rows) > 1]
    if not several:
        return {}
    chosen: dict[str, str] = {}
    for column, (metric, rows) in zip(st.columns(len(several)), several, strict=True):
        counts = ", ".join(f"{s}: {n}" for s, n in zip(rows["setting"], rows["n_checkpoints"], strict=True))
        chosen[metric] = column.selectbox(
            f"Setting of {md_text(metric)}", list(rows["setting"]), index=0, key=f"setting_{metric}",
            bind="query-params", help=f"Checkpoints with a value, per setting: {md_text(counts)}",
        )  # fmt: skip
    cached = "; ".join(f"{md_text(m)} under {len(rows)}" for m, rows in several)
    st.caption(f"Several settings cached ({cached}): each curve shows one setting, never an average of several.")
    return chosen


@st.cache_data(max_entries=32, show_spinner=False)
def _sample_metrics(db: str, gen: int, run: str) -> list[str]:
    return Store(db, lock_timeout=10.0).sample_metrics(run)


@st.cache_data(max_entries=16, show_spinner=False)
def _sample_results(db: str, gen: int, run: str, metric: str) -> pd.DataFrame:
    return Store(db, lock_timeout=10.0).sample_results(run, metric)


def sample_metrics(run: str) -> list[str]:
    """Metrics of ``run`` with per-sample records (lm-eval samples, memorisation rows)."""
    db = str(db_path())
    return guarded(lambda: _sample_metrics(db, generation(), run))


def sample_results(run: str, metric: str) -> pd.DataFrame:
    """Per-sample rows of one metric over a run's checkpoints: step, params_hash, sample_id, value, record."""
    db = str(db_path())
    return guarded(lambda: _sample_results(db, generation(), run, metric))


@st.cache_data(max_entries=8, show_spinner="Building the report…")
def _report(
    db: str, gen: int, runs: tuple[str, ...], loss: str | None, score: str | None, x: str, c: Chosen, full: bool
):
    from analysis.report import ReportOptions, build_report

    options = ReportOptions(loss_metric=loss, downstream_metric=score, x=x, settings=c, full=full)
    return build_report(Store(db, lock_timeout=10.0), list(runs), options)


def report(
    runs: tuple[str, ...],
    loss: str | None,
    score: str | None,
    x: str,
    chosen: Mapping[str, str] | None = None,
    full: bool = False,
):
    """The exported report of ``runs`` (an ``analysis.report.Report``), rebuilt when the cache changes.

    ``full``: every table in full (``report --full``) instead of the page budget."""
    db = str(db_path())
    return guarded(lambda: _report(db, generation(), tuple(runs), loss, score, x, _chosen(chosen), full))


@st.cache_data(max_entries=32, show_spinner="Ranking predictors…")
def _predictor_ranking(db: str, gen: int, runs: tuple[str, ...], downstream: str, loss: str | None, x: str, c: Chosen):
    from analysis.divergence import predictor_ranking as rank

    return rank(_selected(db, gen, runs, c), downstream, loss_metric=loss, x=x)


def predictor_ranking(
    runs: tuple[str, ...], downstream: str, loss: str | None, x: str, chosen: Mapping[str, str] | None = None
) -> pd.DataFrame:
    """Every signal of ``runs`` ranked by how well it predicts ``downstream`` (``divergence.predictor_ranking``)."""
    db, c = str(db_path()), _chosen(chosen)
    return guarded(lambda: _predictor_ranking(db, generation(), tuple(sorted(runs)), downstream, loss, x, c))


@st.cache_data(max_entries=32, show_spinner=False)
def _aligned(db: str, gen: int, runs: tuple[str, ...], loss: str, score: str, x: str, c: Chosen) -> pd.DataFrame:
    from analysis import divergence as dv

    return dv.align(_selected(db, gen, runs, c), loss, score, x=x)


@st.cache_data(max_entries=32, show_spinner=False)
def _windows(
    db: str, gen: int, runs: tuple[str, ...], loss: str, score: str, tol: float, tol_of: str, a: float, x: str,
    c: Chosen,
):  # fmt: skip
    from analysis import divergence as dv
    from analysis.samples import score_items

    frame = _selected(db, gen, runs, c)
    items = score_items(Store(db, lock_timeout=10.0), list(runs), score, frame)  # paired test where items exist
    return dv.divergence_windows(frame, loss, score, loss_tol=tol, tol_of=tol_of, alpha=a, x=x, samples=items)


@st.cache_data(max_entries=32, show_spinner=False)
def _correlations(db: str, gen: int, runs: tuple[str, ...], loss: str, score: str, x: str, window, c: Chosen):
    from analysis import divergence as dv

    return dv.correlations(_aligned(db, gen, runs, loss, score, x, c), loss, [score], window=window)


def divergence(
    runs: tuple[str, ...],
    loss: str,
    score: str,
    tol: float,
    alpha: float,
    x: str,
    chosen: Mapping[str, str] | None = None,
    tol_of: str = "value",
):
    """(windows, aligned checkpoints) of ``loss`` against ``score`` (``chosen`` settings); errors stop the page.

    ``alpha`` is the chance that a run with no real move gets any window (``divergence.divergence_windows``);
    ``tol`` and ``tol_of`` say when the loss counts as flat (``divergence.flat_tolerance``).
    """
    db, runs, c = str(db_path()), tuple(sorted(runs)), _chosen(chosen)
    windows = guarded(lambda: _windows(db, generation(), runs, loss, score, tol, tol_of, alpha, x, c))
    return windows, guarded(lambda: _aligned(db, generation(), runs, loss, score, x, c))


def correlations(
    runs: tuple[str, ...],
    loss: str,
    score: str,
    x: str,
    window: tuple[float, float] | None = None,
    chosen: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """Loss-vs-score correlations per run (``divergence.correlations``) over checkpoints with x in ``window``."""
    db, c = str(db_path()), _chosen(chosen)
    return guarded(lambda: _correlations(db, generation(), tuple(sorted(runs)), loss, score, x, window, c))


def metric_picker(where, label: str, options: list[str], preferred: list[str], key: str) -> str:
    """A selectbox (in container ``where``) bound to the URL; defaults to the first preferred option present.

    The page checks first that there is something to pick (``optional_metric_picker`` where there may not be).
    """
    if not options:
        raise ValueError(f"{label}: no metric to pick from")
    default = next((m for m in preferred if m in options), options[0])
    return where.selectbox(label, options, index=options.index(default), key=key, bind="query-params")


def accuracy_first(scores: list[str]) -> list[str]:
    """Downstream scores with accuracies first (``task/acc,...``, then logged ``.../accuracy``): the default a
    page opens on, since an accuracy is what a reader of the chart expects to see rise."""
    return [m for m in scores if "/acc," in m] + [m for m in scores if m.endswith("/accuracy")] + scores


def optional_metric_picker(where, label: str, options: list[str], preferred: list[str], key: str) -> str | None:
    """``metric_picker``, or None (and no widget) when there is nothing to pick."""
    return metric_picker(where, label, options, preferred, key) if options else None


def signal_view(title: str, family: tuple[str, ...], what: str) -> None:
    """A page of internal signals (one metric family) over training and against a downstream score."""
    from analysis import divergence as dv
    from analysis.charts import curves_figure, metric_vs_figure
    from analysis.divergence.defaults import separating_signal

    sel = selection()
    st.title(title)
    if not sel.runs:
        st.info("Pick runs in the sidebar.")
        st.stop()
    frame = long_table(sel.runs)
    names = metric_names(frame)
    signals = [m for m in names if m in family]
    if not signals:
        st.warning(f"No {what} cached for these runs yet.")
        st.code(f"python -m analysis eval --run {sel.runs[0]} --metrics {','.join(family[:3])}")
        st.page_link("pages/evaluate.py", label="Open the Evaluate page", icon=":material/play_arrow:")
        return
    c1, c2, c3 = st.columns([3, 3, 2])
    scores = dv.downstream_metrics(names)
    score = optional_metric_picker(c2, "Downstream", scores, accuracy_first(scores), "score")
    best, verdict = None, ""
    if score:  # open on the signal that separates the runs the way the score does, if one does
        losses = dv.loss_metrics(names)
        ranking = predictor_ranking(sel.runs, score, losses[0] if losses else None, sel.x)
        best, verdict = separating_signal(ranking, signals, md_text(score), what)
    signal = metric_picker(c1, "Signal", signals, [best, *signals] if best else signals, "signal")
    if verdict:
        (st.caption if best else st.info)(verdict)
    log_x = c3.toggle("Log x", value=True, key="logx", bind="query-params")
    log_y = c3.toggle("Log y", value=False, key="logy", bind="query-params")
    frame = long_table(sel.runs, setting_picker(sel.runs, [signal, score]))
    curve = curves_figure(frame, signal, x=sel.x, log_x=log_x, log_y=log_y, colors=sel.colors, style=sel.style)
    st.plotly_chart(curve, width="stretch", key="signal_curve")
    if score:
        fig = metric_vs_figure(frame, signal, score, x=sel.x, log_metric=log_y, colors=sel.colors, style=sel.style)
        st.plotly_chart(fig, width="stretch", key="signal_vs")
    table = frame[frame["metric"].isin(signals)].pivot_table(index=["run", "step"], columns="metric", values="value")
    st.dataframe(table.reset_index(), hide_index=True, width="stretch")


# Characters that markdown (and Streamlit's labels, captions and st.markdown) give a meaning to.
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>~$])")


def md_text(text: object) -> str:
    """``text`` for a markdown string, label or caption, shown as typed: never a link, image or HTML.

    Run names, paths, task names and error messages come from folders and files a user was handed.
    """
    return _MARKDOWN_SPECIAL.sub(r"\\\1", str(text))
