"""Cached reads of the cache file for the pages: the ``st.cache_data`` readers and their page-side wrappers.

Reads are keyed by the store's write generation, so a page shows new results as soon as a job commits
them, and never holds the database file open (DuckDB lets no other process open it meanwhile). Each
wrapper reads the generation once per script run and turns a cache problem into one clear error.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

import pandas as pd
import streamlit as st

from analysis.flops import add_flops_column, store_parameter_counts
from analysis.settings import select_settings, settings_table
from analysis.store import DEFAULT_DB, Store, StoreLockedError


def db_path() -> Path:
    """The cache file: ``-- --db PATH`` after ``streamlit run app.py``, else $CDD_DB, else the default."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--db", default=os.environ.get("CDD_DB", str(DEFAULT_DB)))
    args, _ = parser.parse_known_args(sys.argv[1:])
    return Path(args.db)


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
def _within_runs(db: str, gen: int, runs: tuple[str, ...], signal: str, downstream: str, loss: str, x: str, c: Chosen):
    from analysis.divergence import within_runs as within

    return within(_selected(db, gen, runs, c), signal, downstream, loss, x=x)


def within_runs(
    runs: tuple[str, ...], signal: str, downstream: str, loss: str, x: str, chosen: Mapping[str, str] | None = None
) -> dict[str, float]:
    """Per run, whether ``signal`` beats the loss at predicting ``downstream`` (``divergence.within_runs``)."""
    db, c = str(db_path()), _chosen(chosen)
    return guarded(lambda: _within_runs(db, generation(), tuple(sorted(runs)), signal, downstream, loss, x, c)) or {}


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
