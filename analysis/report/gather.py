"""Gathering a report's data: the runs checked against the cache, the metrics it analyses, and every value.

``read_context`` reads the cache once into the ``ReportContext`` the sections share (one setting per
metric, as the pages read it); ``data_table`` is every logged and computed value with its provenance (the
data export); ``tool_versions`` names what drew the report.
"""

from __future__ import annotations

import difflib
import importlib.metadata as md
import platform
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from analysis import divergence as dv
from analysis.charts import ChartStyle, run_colors
from analysis.flops import add_flops_column, store_parameter_counts
from analysis.report.context import ReportContext
from analysis.report.model import ReportOptions
from analysis.settings import select_settings, settings_table
from analysis.store import Store, library_versions

DATA_COLUMNS = [
    "run", "step", "tokens", "metric", "value", "stderr", "n", "source", "fingerprint", "params_hash", "params",
    "code_version", "lib_versions", "computed_at",
]  # fmt: skip


@dataclass(frozen=True)
class Gathered:
    """What ``read_context`` read: the shared context, and the runs' rows the runs, summary and provenance need."""

    ctx: ReportContext
    info: pd.DataFrame  # the store's runs table, one row per report run, in the report's order
    checkpoints: pd.DataFrame  # every registered checkpoint of the runs, with a run column
    sources: dict[str, str]  # run -> where it was registered from


def checked_runs(store: Store, runs: Sequence[str] | str) -> tuple[list[str], pd.DataFrame]:
    """The report's runs without repeats, and the store's runs table; ValueError for none or an unknown run."""
    runs = list(dict.fromkeys([runs] if isinstance(runs, str) else runs))
    if not runs:
        raise ValueError("name at least one run: --run NAME")
    registered = store.runs()
    known = list(registered["name"]) if len(registered) else []
    for run in runs:
        if run not in known:
            hint = ", ".join(known) or "none; add one with `python -m analysis add-run PATH`"
            raise ValueError(f"unknown run {run!r} in {store.path}; known runs: {hint}")
    return runs, registered


def read_context(
    store: Store, runs: list[str], registered: pd.DataFrame, options: ReportOptions, style: ChartStyle
) -> Gathered:
    """Read ``runs`` (checked against ``registered``, the store's runs table) and the metrics to analyse.

    The context holds the long table under one setting per metric, and ``options`` with its loss and downstream
    metrics resolved (None when none is cached).
    """
    known = list(registered["name"]) if len(registered) else []
    colors = run_colors(known)  # the sidebar's colours: every registered run, so a run looks the same everywhere
    info = registered.set_index("name").loc[runs].reset_index()
    checkpoints = pd.concat([store.checkpoints(r).assign(run=r) for r in runs], ignore_index=True)
    raw = store.long_table(runs)
    # One setting per metric, as on the pages: values of different settings are never averaged.
    frame = select_settings(raw, dict(options.settings))
    if options.x == "flops":  # 6 * N * tokens, N read off each run's last checkpoint (analysis.flops)
        frame = add_flops_column(frame, {r: n for r, (n, _, _) in store_parameter_counts(store, runs).items()})
    names = sorted(frame["metric"].unique()) if len(frame) else []
    losses, scores = dv.loss_metrics(names), dv.accuracy_first(dv.downstream_metrics(names))
    loss = pick_metric("loss", options.loss_metric, losses, names)
    score = pick_metric("downstream", options.downstream_metric, scores, names)
    options = replace(options, loss_metric=loss, downstream_metric=score)
    sources = dict(zip(info["name"], info["source"], strict=True))
    ctx = ReportContext(store, runs, options, style, colors, frame, names, settings_table(raw))
    return Gathered(ctx, info, checkpoints, sources)


def pick_metric(kind: str, wanted: str | None, candidates: list[str], names: list[str]) -> str | None:
    """The metric to analyse: the one asked for (it must exist) or the first candidate."""
    if wanted is None:
        return candidates[0] if candidates else None
    if wanted not in names:
        close = difflib.get_close_matches(wanted, names, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"available: {', '.join(candidates) or '(none)'}"
        raise ValueError(f"{kind} metric {wanted!r} is not cached for these runs; {hint}")
    return wanted


def tool_versions() -> dict[str, str]:
    """Python and the libraries that drew this report, plus those that shape cached values."""
    out = {"python": platform.python_version()}
    for name in ("numpy", "pandas", "plotly", "duckdb", "pyarrow", "kaleido"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "absent"
    return out | library_versions()


def data_table(store: Store, runs: list[str], checkpoints: pd.DataFrame, sources: dict[str, str]) -> pd.DataFrame:
    """Every logged and computed value of ``runs`` with its provenance, one row per value (DATA_COLUMNS)."""
    parts = []
    log = store.log_series(runs)
    if len(log):
        log = log.assign(stderr=np.nan, n=pd.NA, source="log", fingerprint="", params_hash="", params="")
        log["code_version"] = log["run"].map(lambda r: f"training log {sources.get(r, '')}")
        parts.append(log.assign(lib_versions="", computed_at=pd.NaT))
    results = store.results(runs)
    if len(results):
        fp = checkpoints[["run", "step", "fingerprint"]] if len(checkpoints) else None
        if fp is not None:
            # A result row is only ever written for its checkpoint's current fingerprint (store.write_results).
            results = results.merge(fp, on=["run", "step"], how="left")
        else:
            results["fingerprint"] = ""
        parts.append(results.rename(columns={"created_at": "computed_at"}).assign(source="result"))
    if not parts:
        return pd.DataFrame(columns=DATA_COLUMNS)
    frame = pd.concat([p.reindex(columns=DATA_COLUMNS) for p in parts], ignore_index=True)
    return frame.sort_values(["run", "source", "metric", "step"], ignore_index=True)
