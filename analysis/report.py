"""Exported reports: the dashboard's figures and numbers in one file that opens anywhere, offline.

``build_report(store, runs)`` reads the cache and computes every section with the same functions the
pages call (``analysis.divergence`` and ``analysis.charts``), so a report shows the numbers the pages show.
Writers turn a ``Report`` into a file; ``export`` picks one from the file's suffix:

    .html      one self-contained page: plotly.js inlined once, figures interactive, no network needed
    .pdf       the HTML printed by headless Chromium (mode bar hidden, a page per section)
    .md        Markdown beside a folder of PNG figures (rendered by kaleido in the same Chromium)
    .zip       the Markdown, its figures and the data as CSV in one archive
    .csv       every number of the report with its provenance, one row per value
    .parquet   the same table as Parquet

Nothing here downloads a browser: without Chromium, HTML, CSV and Parquet export as usual, Markdown
exports without figures, and PDF fails with the command that installs Chromium.
"""

from __future__ import annotations

import asyncio
import html
import importlib.metadata as md
import json
import math
import os
import platform
import re
import shlex
import shutil
import subprocess
import tempfile
import uuid
import zipfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio

from analysis import divergence as dv
from analysis.charts import (
    ChartStyle,
    curves_figure,
    loss_downstream_figure,
    matched_loss_figure,
    ranking_heatmap,
    run_colors,
    trajectory_figure,
)
from analysis.store import DEFAULT_DB, Store, library_versions

# The metric families of the Geometry and Pathways pages (pages/geometry.py, pages/pathways.py).
FLATNESS = (
    "hessian_trace", "hessian_top_eigenvalue", "fisher_trace", "adaptive_sharpness",
    "perturbation_sensitivity", "sam_sharpness", "gradient_alignment",
)  # fmt: skip
PATHWAYS = (
    "pathway_distance", "pathway_consistency", "routing_entropy", "expert_load",
    "pathway_distance_chars", "pathway_consistency_normalized",
)  # fmt: skip

FORMATS = {
    ".html": "html", ".htm": "html", ".pdf": "pdf", ".md": "md", ".zip": "zip", ".csv": "csv", ".parquet": "parquet",
}  # fmt: skip
CHROMIUM = "/usr/bin/chromium"
INSTALL_CHROMIUM = "apt-get install -y chromium"
# A4 with 12 mm side margins leaves 186 mm = 703 CSS pixels; figures in the PDF are drawn narrower than that.
PRINT_WIDTH = 680
PNG_WIDTH = 1000
DATA_COLUMNS = [
    "run", "step", "tokens", "metric", "value", "stderr", "n", "source", "fingerprint", "params_hash", "params",
    "code_version", "lib_versions", "computed_at",
]  # fmt: skip


class ChromiumMissingError(FileNotFoundError):
    """No Chromium to print a PDF with."""


# -- the report model ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReportOptions:
    """What the report analyses; the defaults are the Divergence and Compare pages' defaults."""

    loss_metric: str | None = None  # None: the page's default (eval/loss, then train/loss, ...)
    downstream_metric: str | None = None  # None: the first lm-eval score
    x: str = "step"  # step, tokens or flops
    loss_tol: float = 0.02  # loss counts as flat within this fraction of its value
    z: float = 3.0  # a downstream move counts when larger than z combined stderrs
    levels: int = 8  # matched-loss levels
    log_x: bool = True
    n_boot: int = 1000  # bootstrap resamples for the correlation intervals

    def __post_init__(self) -> None:
        if self.x not in dv.X_AXES:
            raise ValueError(f"x-axis {self.x!r}: choose one of {', '.join(dv.X_AXES)}")
        if self.loss_tol < 0 or self.z < 0:
            raise ValueError("loss_tol and z must be >= 0")
        if self.levels < 1:
            raise ValueError(f"levels={self.levels}: ask for at least one loss level")


@dataclass(frozen=True)
class Missing:
    """Something a section could not show, and the command that computes it."""

    what: str
    command: str | None = None


@dataclass(frozen=True)
class ReportFigure:
    key: str
    title: str
    figure: go.Figure
    caption: str = ""


@dataclass(frozen=True)
class ReportTable:
    key: str
    title: str
    frame: pd.DataFrame
    caption: str = ""


@dataclass
class Section:
    key: str
    title: str
    text: list[str] = field(default_factory=list)
    figures: list[ReportFigure] = field(default_factory=list)
    tables: list[ReportTable] = field(default_factory=list)
    missing: list[Missing] = field(default_factory=list)


@dataclass
class Report:
    """Everything a writer needs: sections in order, the data behind them, and where it came from."""

    title: str
    runs: tuple[str, ...]
    db: str
    generated_at: datetime
    options: ReportOptions  # with the loss and downstream metrics resolved (None when there is none)
    sections: list[Section]
    data: pd.DataFrame  # every cached value of the runs with its provenance (DATA_COLUMNS)
    tables: dict[str, pd.DataFrame]  # the derived tables (windows, matched loss, ranking, ...) by key
    tool_versions: dict[str, str]

    @property
    def figures(self) -> list[ReportFigure]:
        return [f for s in self.sections for f in s.figures]

    @property
    def missing(self) -> list[Missing]:
        return [m for s in self.sections for m in s.missing]

    def section(self, key: str) -> Section:
        for s in self.sections:
            if s.key == key:
                return s
        raise KeyError(f"no section {key!r}; sections: {', '.join(s.key for s in self.sections)}")


# -- numbers as the report prints them ----------------------------------------------------------------------


def fmt_number(value) -> str:
    """A cell as every writer prints it: integers whole, other numbers to 4 significant digits, '–' if missing."""
    if value is None or value is pd.NA or value is pd.NaT:
        return "–"
    if isinstance(value, bool | np.bool_):
        return "yes" if value else "no"
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        v = float(value)
        if math.isnan(v):
            return "–"
        if math.isinf(v):
            return "∞" if v > 0 else "-∞"
        return str(int(v)) if v.is_integer() and abs(v) < 1e15 else f"{v:.4g}"
    if isinstance(value, pd.Timestamp | datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    return str(value)


def fmt_estimate(value, stderr) -> str:
    """``value ± stderr`` (just the value when the stderr is missing)."""
    se = pd.to_numeric(pd.Series([stderr]), errors="coerce").iloc[0]
    return fmt_number(value) + (f" ± {fmt_number(float(se))}" if pd.notna(se) else "")


def _cells(frame: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    header = [str(c) for c in frame.columns]
    rows = [[fmt_number(v) for v in row] for row in frame.itertuples(index=False, name=None)]
    return header, rows


# -- building ------------------------------------------------------------------------------------------------


def _db_flag(store: Store) -> str:
    return "" if Path(store.path) == DEFAULT_DB else f" --db {shlex.quote(str(store.path))}"


def _eval_command(store: Store, run: str, *, tasks: str | None = None, metrics: str | None = None) -> str:
    parts = [f"python -m analysis eval --run {shlex.quote(run)}"]
    if tasks:
        parts.append(f"--tasks {tasks}")
    if metrics:
        parts.append(f"--metrics {metrics}")
    return " ".join(parts) + _db_flag(store)


def _pick(kind: str, wanted: str | None, candidates: list[str], names: list[str]) -> str | None:
    """The metric to analyse: the one asked for (it must exist) or the first candidate."""
    if wanted is None:
        return candidates[0] if candidates else None
    if wanted not in names:
        import difflib

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


def _data_table(store: Store, runs: list[str], checkpoints: pd.DataFrame, sources: dict[str, str]) -> pd.DataFrame:
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


def build_report(
    store: Store,
    runs: Sequence[str],
    options: ReportOptions | None = None,
    *,
    style: ChartStyle | None = None,
    now: datetime | None = None,
) -> Report:
    """Read ``runs`` from the cache and compute every section of the report.

    Unknown run names raise a one-line ValueError. Missing data never does: the section concerned says
    what is missing and the command that computes it.
    """
    runs = list(dict.fromkeys([runs] if isinstance(runs, str) else runs))
    if not runs:
        raise ValueError("name at least one run: --run NAME")
    registered = store.runs()
    known = list(registered["name"]) if len(registered) else []
    for run in runs:
        if run not in known:
            hint = ", ".join(known) or "none; add one with `python -m analysis add-run PATH`"
            raise ValueError(f"unknown run {run!r} in {store.path}; known runs: {hint}")
    options = options or ReportOptions()
    style = style or ChartStyle()
    colors = run_colors(known)  # the sidebar's colours: every registered run, so a run looks the same everywhere
    info = registered.set_index("name").loc[runs].reset_index()
    checkpoints = pd.concat([store.checkpoints(r).assign(run=r) for r in runs], ignore_index=True)
    frame = store.long_table(runs)
    names = sorted(frame["metric"].unique()) if len(frame) else []
    losses, scores = dv.loss_metrics(names), dv.downstream_metrics(names)
    loss = _pick("loss", options.loss_metric, losses, names)
    score = _pick("downstream", options.downstream_metric, scores, names)
    options = replace(options, loss_metric=loss, downstream_metric=score)
    sources = dict(zip(info["name"], info["source"], strict=True))
    ctx = _Context(store, runs, options, style, colors, frame, names)

    sections = [_runs_section(ctx, info)]
    sections += _divergence_sections(ctx)
    sections.append(_matched_section(ctx))
    sections.append(_ranking_section(ctx))
    sections.append(_signal_section(ctx, "flatness", "Flatness", FLATNESS, "hessian_trace,fisher_trace"))
    sections.append(_signal_section(ctx, "pathways", "Pathways", PATHWAYS, "pathway_distance,pathway_consistency"))
    sections.append(_results_section(ctx))
    data = _data_table(store, runs, checkpoints, sources)
    versions = tool_versions()
    sections.append(_provenance_section(ctx, data, checkpoints, sources, versions, now))
    return Report(
        title="Checkpoint divergence report: " + ", ".join(runs),
        runs=tuple(runs),
        db=str(store.path),
        generated_at=(now or datetime.now(UTC)).astimezone(UTC),
        options=options,
        sections=sections,
        data=data,
        tables=ctx.tables,
        tool_versions=versions,
    )


@dataclass
class _Context:
    store: Store
    runs: list[str]
    options: ReportOptions
    style: ChartStyle
    colors: dict[str, str]
    frame: pd.DataFrame  # the long table, as the pages read it
    names: list[str]
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)

    def runs_with(self, metric: str | None) -> list[str]:
        if metric is None or not len(self.frame):
            return []
        present = set(self.frame.loc[self.frame["metric"] == metric, "run"])
        return [r for r in self.runs if r in present]


def _runs_section(ctx: _Context, info: pd.DataFrame) -> Section:
    s = Section("runs", "Runs and settings")
    o = ctx.options
    s.text.append(
        f"{len(ctx.runs)} run(s) from the cache {ctx.store.path}. Every figure and number below is computed from "
        "that cache by the same code the dashboard's pages use; the last section gives the provenance of each one."
    )
    table = pd.DataFrame(
        {
            "run": info["name"],
            "source": info["source"],
            "checkpoints": info["checkpoints"],
            "first step": info["first_step"],
            "last step": info["last_step"],
            "logged metrics": info["log_metrics"],
            "cached results": info["results"],
            "remote code": info["trust_remote_code"],
            "config": info["config"],
        }
    )
    s.tables.append(ReportTable("runs", "Runs", table))
    settings = pd.DataFrame(
        [
            ("loss metric", o.loss_metric or "(none cached)"),
            ("downstream metric", o.downstream_metric or "(none cached)"),
            ("x-axis", o.x),
            ("flat loss within (relative)", f"{o.loss_tol:.0%}"),
            ("significance (z, combined stderr)", fmt_number(o.z)),
            ("matched-loss levels", str(o.levels)),
            ("bootstrap resamples (95% intervals)", str(o.n_boot)),
        ],
        columns=["setting", "value"],
    )
    s.tables.append(ReportTable("settings", "Analysis settings", settings))
    for row in info.itertuples(index=False):
        if not row.checkpoints:
            s.missing.append(
                Missing(f"run {row.name!r} has no checkpoints registered", "python -m analysis add-run PATH")
            )
    return s


def _needs_pair(ctx: _Context, section: Section) -> bool:
    """Record what is missing for the loss/downstream sections; True when they can be drawn."""
    loss, score = ctx.options.loss_metric, ctx.options.downstream_metric
    if loss is None:
        section.missing.append(
            Missing(
                "no loss cached for these runs (a training log with a loss, or heldout_loss)",
                _eval_command(ctx.store, ctx.runs[0], metrics="heldout_loss"),
            )
        )
    if score is None:
        section.missing.append(
            Missing(
                "no downstream score cached for these runs (lm-eval results)",
                _eval_command(ctx.store, ctx.runs[0], tasks="modarith_em,modarith_mc"),
            )
        )
    if loss is None or score is None:
        return False
    for run in ctx.runs:
        if run not in ctx.runs_with(loss):
            section.missing.append(
                Missing(f"run {run!r} has no {loss}", _eval_command(ctx.store, run, metrics="heldout_loss"))
            )
        if run not in ctx.runs_with(score):
            task = score.split("/", 1)[0]
            section.missing.append(Missing(f"run {run!r} has no {score}", _eval_command(ctx.store, run, tasks=task)))
    return True


def _divergence_sections(ctx: _Context) -> list[Section]:
    o = ctx.options
    curves = Section("curves", "Loss and downstream")
    windows_section = Section("windows", "Divergence windows")
    if not _needs_pair(ctx, curves):
        windows_section.missing.append(Missing("needs a loss and a downstream score (see the section above)"))
        return [curves, windows_section]
    loss, score = o.loss_metric, o.downstream_metric
    windows = dv.divergence_windows(ctx.frame, loss, score, loss_tol=o.loss_tol, z=o.z, x=o.x)
    aligned = dv.align(ctx.frame, loss, score, x=o.x)
    corr = dv.correlations(aligned, loss, [score], n_boot=o.n_boot)
    ctx.tables |= {"windows": windows, "aligned": aligned, "correlations": corr}

    curves.text.append(
        f"{loss} (top) and {score} (bottom) against {o.x}, one colour per run; shaded spans are the divergence "
        "windows of the next section. The second figure follows each run through its checkpoints in the "
        "(loss, score) plane: a vertical stretch is downstream ability changing at constant loss."
    )
    curves.figures.append(
        ReportFigure(
            "curves",
            f"{loss} and {score}",
            loss_downstream_figure(
                ctx.frame, loss, score, x=o.x, log_x=o.log_x, colors=ctx.colors, style=ctx.style, windows=windows
            ),
        )
    )
    curves.figures.append(
        ReportFigure(
            "trajectory", f"{score} against {loss}", trajectory_figure(aligned, colors=ctx.colors, style=ctx.style)
        )
    )
    curves.tables.append(
        ReportTable(
            "correlations",
            "Correlation of loss and downstream across checkpoints",
            corr,
            f"Spearman and Pearson with 95% bootstrap intervals ({o.n_boot} resamples, seed 0).",
        )
    )
    points = aligned[["run", "step", "tokens", "left", "right", "right_stderr"]].rename(
        columns={"left": f"{loss} (interpolated)", "right": score, "right_stderr": "stderr"}
    )
    curves.tables.append(ReportTable("checkpoint_scores", "Loss and downstream at each checkpoint", points))

    windows_section.text.append(
        f"Spans of checkpoints where {loss} stays flat within {o.loss_tol:.0%} while {score} rises by more than "
        f"{fmt_number(o.z)} combined stderrs (grokking), or where the loss improves while {score} falls by as "
        f"much (inverse). start and end are in {o.x} units."
    )
    if len(windows):
        windows_section.tables.append(ReportTable("windows", "Windows found", windows))
    else:
        windows_section.text.append("No such window in these runs.")
    return [curves, windows_section]


def _matched_section(ctx: _Context) -> Section:
    o = ctx.options
    s = Section("matched", "Matched-loss comparison")
    loss, score = o.loss_metric, o.downstream_metric
    both = [r for r in ctx.runs_with(loss) if r in ctx.runs_with(score)]
    if loss is None or score is None:
        s.missing.append(Missing("needs a loss and a downstream score (see Loss and downstream)"))
        return s
    if len(both) < 2:
        runs = " ".join(f"--run {shlex.quote(r)}" for r in ctx.runs)
        s.missing.append(
            Missing(
                f"needs two runs with both {loss} and {score}; this report has {len(both)}",
                f"python -m analysis report {runs} --run OTHER_RUN --out report.html{_db_flag(ctx.store)}",
            )
        )
        return s
    matched = dv.matched_loss(ctx.frame, loss, score, both, levels=o.levels, x=o.x)
    ctx.tables["matched_loss"] = matched
    reference = both[0]
    s.text.append(
        f"Each run's {score} at {o.levels} common levels of {loss} (interpolated between the checkpoints that "
        f"first reached each level), and its gap to the reference run {reference}."
    )
    if not len(matched):
        s.text.append("The runs' loss ranges do not overlap, so there is no common loss to compare at.")
        return s
    gaps = matched[matched["run"] != reference]
    best = gaps.loc[gaps["gap"].abs().idxmax()]
    s.text.append(
        f"Largest gap to {reference} at the same {loss}: {best['gap']:+.3f} ± {best['gap_stderr']:.3f} "
        f"({best['run']} at {loss} = {best['loss_level']:.4g})."
    )
    s.figures.append(
        ReportFigure(
            "matched", f"{score} at matched {loss}", matched_loss_figure(matched, colors=ctx.colors, style=ctx.style)
        )
    )
    s.tables.append(ReportTable("matched_loss", "Downstream at matched loss", matched))
    return s


def _ranking_section(ctx: _Context) -> Section:
    o = ctx.options
    s = Section("ranking", "Predictor ranking")
    if o.downstream_metric is None:
        s.missing.append(Missing("needs a downstream score (see above)"))
        return s
    ranking = dv.predictor_ranking(ctx.frame, o.downstream_metric, loss_metric=o.loss_metric, x=o.x)
    ctx.tables["ranking"] = ranking
    s.text.append(
        f"Every cached signal ranked by how well it predicts {o.downstream_metric} across the checkpoints of all "
        "runs pooled: Spearman's rho, and the leave-one-out error of a monotone fit. The loss is the baseline "
        "a signal has to beat."
    )
    if not len(ranking):
        s.missing.append(
            Missing(
                "too few checkpoints with both a signal and a downstream score to rank anything (4 needed)",
                _eval_command(ctx.store, ctx.runs[0], metrics="heldout_loss,hessian_trace"),
            )
        )
        return s
    s.figures.append(
        ReportFigure("ranking", "Which signal predicts downstream", ranking_heatmap(ranking, style=ctx.style))
    )
    s.tables.append(ReportTable("ranking", "Predictors, strongest first", ranking))
    return s


def _signal_section(ctx: _Context, key: str, title: str, family: tuple[str, ...], suggest: str) -> Section:
    o = ctx.options
    s = Section(key, title)
    present = [m for m in family if m in ctx.names]
    if not present:
        runs = ", ".join(ctx.runs)
        s.missing.append(
            Missing(
                f"no {title.lower()} metrics cached for {runs} ({', '.join(family)})",
                _eval_command(ctx.store, ctx.runs[0], metrics=suggest),
            )
        )
        return s
    s.text.append(f"The {title.lower()} metrics cached for these runs, per checkpoint (mean ± stderr).")
    for metric in present:
        for run in ctx.runs:
            if run not in ctx.runs_with(metric):
                s.missing.append(Missing(f"run {run!r} has no {metric}", _eval_command(ctx.store, run, metrics=metric)))
        fig = curves_figure(ctx.frame, metric, x=o.x, log_x=o.log_x, colors=ctx.colors, style=ctx.style)
        s.figures.append(ReportFigure(f"{key}-{metric}", metric, fig))
    rows = ctx.frame[ctx.frame["metric"].isin(present)]
    rows = rows.groupby(["run", "step", "metric"], as_index=False).agg(
        tokens=("tokens", "min"), value=("value", "mean"), stderr=("stderr", "mean")
    )
    rows["estimate"] = [fmt_estimate(v, e) for v, e in zip(rows["value"], rows["stderr"], strict=True)]
    table = rows.pivot_table(index=["run", "step"], columns="metric", values="estimate", aggfunc="first")
    table = table.reindex(columns=present).reset_index()
    table.columns.name = None
    ctx.tables[key] = rows.drop(columns="estimate")
    s.tables.append(ReportTable(key, f"{title} metrics per checkpoint", table))
    return s


def _results_section(ctx: _Context) -> Section:
    s = Section("results", "Cached results")
    s.text.append(
        "Every computed value of each run, per checkpoint. Values cached under several parameter sets are "
        "averaged, as in the analysis; the data export (CSV or Parquet) has each one separately."
    )
    results = ctx.frame[ctx.frame["source"] == "result"] if "source" in ctx.frame else ctx.frame.iloc[:0]
    for run in ctx.runs:
        mine = results[results["run"] == run]
        if not len(mine):
            s.missing.append(
                Missing(
                    f"run {run!r} has no computed results",
                    _eval_command(ctx.store, run, tasks="modarith_em,modarith_mc", metrics="heldout_loss"),
                )
            )
            continue
        table = mine.pivot_table(index="step", columns="metric", values="value", aggfunc="mean").reset_index()
        table.columns.name = None
        s.tables.append(ReportTable(f"results-{run}", f"{run}", table))
    return s


def _span(steps: pd.Series) -> str:
    steps = pd.to_numeric(steps, errors="coerce").dropna()
    if not len(steps):
        return "–"
    lo, hi = int(steps.min()), int(steps.max())
    return f"{lo}–{hi} ({steps.nunique()})" if lo != hi else f"{lo} (1)"


def _provenance_section(
    ctx: _Context,
    data: pd.DataFrame,
    checkpoints: pd.DataFrame,
    sources: dict[str, str],
    versions: dict[str, str],
    now: datetime | None,
) -> Section:
    s = Section("provenance", "Provenance")
    s.text.append(
        "Where each number comes from. Computed values: the checkpoints they were computed on (their content "
        "fingerprints are listed below), the metric or task version, the parameters and their hash, the library "
        "versions and the time of computation. Logged values: the run's training log. The data export has this "
        "for every single value."
    )
    rows = []
    results = data[data["source"] == "result"]
    if len(results):
        keys = ["run", "metric", "params_hash", "code_version", "lib_versions"]
        for (run, metric, phash, code, libs), group in results.groupby(keys, sort=True, dropna=False):
            fps = group["fingerprint"].dropna().unique()
            try:
                lib_text = ", ".join(f"{k} {v}" for k, v in sorted(json.loads(libs).items()))
            except (TypeError, ValueError):
                lib_text = str(libs)
            when = pd.to_datetime(group["computed_at"], errors="coerce")
            first, last = fmt_number(when.min()), fmt_number(when.max())
            rows.append(
                {
                    "run": run,
                    "metric": metric,
                    "steps (count)": _span(group["step"]),
                    "checkpoints": fps[0] if len(fps) == 1 else f"{len(fps)} (listed below)",
                    "version": code,
                    "params hash": phash,
                    "libraries": lib_text,
                    "computed at": first if first == last else f"{first} to {last}",
                }
            )
        s.tables.append(ReportTable("provenance_results", "Computed values", pd.DataFrame(rows)))
        params = results.drop_duplicates("params_hash")[["params_hash", "params"]]
        params = params.rename(columns={"params_hash": "params hash"}).sort_values("params hash")
        s.tables.append(ReportTable("parameters", "Parameter sets", params, "The parameters behind each params hash."))
    logs = data[data["source"] == "log"]
    if len(logs):
        table = logs.groupby(["run", "metric"], as_index=False).agg(steps=("step", _span))
        table["from"] = table["run"].map(lambda r: f"training log of {sources.get(r, '?')}")
        s.tables.append(
            ReportTable("provenance_logs", "Logged values", table.rename(columns={"steps": "steps (count)"}))
        )
    if len(checkpoints):
        table = checkpoints[["run", "step", "tokens", "fingerprint", "path"]]
        s.tables.append(ReportTable("checkpoints", "Checkpoints", table))
    generated = (now or datetime.now(UTC)).astimezone(UTC)
    about = [("generated", generated.strftime("%Y-%m-%d %H:%M:%S UTC")), ("cache file", str(ctx.store.path))]
    about += [(name, version) for name, version in versions.items()]
    s.tables.append(ReportTable("about", "This report", pd.DataFrame(about, columns=["item", "value"])))
    return s


# -- HTML ---------------------------------------------------------------------------------------------------

_CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, "DejaVu Sans", Arial, sans-serif; color: #1f2328;
       margin: 0 auto; max-width: 1100px; padding: 24px; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.3em; border-bottom: 1px solid #d0d7de; padding-bottom: 0.2em; margin-top: 1.6em; }
h3 { font-size: 1.05em; margin: 1.2em 0 0.4em; }
.meta { color: #59636e; font-size: 0.9em; }
nav ol { columns: 2; font-size: 0.95em; }
figure { margin: 1em 0; }
figcaption, .caption { color: #59636e; font-size: 0.85em; }
.missing { background: #fff8c5; border-left: 4px solid #d4a72c; padding: 0.5em 0.8em; margin: 0.6em 0; }
code { background: #f0f2f4; padding: 0.1em 0.3em; border-radius: 3px; font-size: 0.9em; overflow-wrap: anywhere; }
.table-wrap { overflow-x: auto; }
table { border-collapse: collapse; font-size: 0.82em; margin: 0.4em 0 1em; }
th, td { border: 1px solid #d0d7de; padding: 3px 6px; text-align: left; vertical-align: top; }
th { background: #f6f8fa; }
td { overflow-wrap: break-word; max-width: 28em; }
td.long { overflow-wrap: anywhere; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tbody tr:nth-child(even) { background: #fafbfc; }
@page { size: A4; margin: 14mm 12mm; }
@media print {
  body { max-width: none; padding: 0; font-size: 10pt; }
  section.breaks { break-before: page; }
  h2, h3 { break-after: avoid; }
  figure { break-inside: avoid; }
  thead { display: table-header-group; }
  tr { break-inside: avoid; }
  .table-wrap { overflow: visible; }
  table { font-size: 7.5pt; width: 100%; }
  td { max-width: none; }
  .modebar-container { display: none !important; }
}
"""


_NUMBER = re.compile(r"[-+]?(\d[\d.]*(e[-+]?\d+)?|∞|-∞)( ± [\d.e+-]+)?")


def _breakable(text: str) -> str:
    """Escaped text that may wrap after the separators of metric names and paths (task/metric,filter)."""
    return re.sub(r"([/,_])", r"\1<wbr>", html.escape(text))


def _html_table(table: ReportTable) -> str:
    header, rows = _cells(table.frame)
    # Numeric columns are right-aligned; long unbroken strings (fingerprints, paths, JSON) may wrap anywhere.
    numeric = [all(r[i] == "–" or _NUMBER.fullmatch(r[i]) for r in rows) for i in range(len(header))]
    head = "".join(f"<th>{_breakable(h)}</th>" for h in header)

    def cell(text: str, i: int) -> str:
        css = "num" if numeric[i] else "long" if len(text) > 24 and " " not in text else ""
        if css == "long":
            return f'<td class="long">{_breakable(text)}</td>'
        return f'<td class="{css}">{html.escape(text)}</td>' if css else f"<td>{html.escape(text)}</td>"

    body = "".join("<tr>" + "".join(cell(c, i) for i, c in enumerate(row)) + "</tr>" for row in rows)
    caption = f'<p class="caption">{html.escape(table.caption)}</p>' if table.caption else ""
    return (
        f'<h3 id="table-{_slug(table.key)}">{html.escape(table.title)}</h3>{caption}'
        f'<div class="table-wrap"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'
    )


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-") or "x"


def _figure_html(fig: ReportFigure, index: int, *, for_print: bool) -> str:
    figure = fig.figure
    if for_print:
        # Printing does not resize a responsive plot: draw it at the printable width, static, without mode bar.
        figure = go.Figure(figure).update_layout(width=PRINT_WIDTH)
        config = {"displayModeBar": False, "staticPlot": True}
    else:
        config = {"displaylogo": False, "responsive": True}
    div = pio.to_html(
        figure,
        full_html=False,
        include_plotlyjs=False,
        include_mathjax=False,
        div_id=f"fig-{index}-{_slug(fig.key)}",
        config=config,
        default_height=f"{figure.layout.height or 420}px",
    )
    caption = f"<figcaption>{html.escape(fig.caption)}</figcaption>" if fig.caption else ""
    return f'<figure class="chart">{div}{caption}</figure>'


def render_html(report: Report, *, for_print: bool = False) -> str:
    """The report as one HTML page: plotly.js inlined once in the head, MathJax off, no network URL."""
    from plotly.offline import get_plotlyjs

    parts = []
    index = 0
    for n, section in enumerate(report.sections):
        body = [f"<h2>{html.escape(section.title)}</h2>"]
        body += [f"<p>{html.escape(t)}</p>" for t in section.text]
        for m in section.missing:
            cmd = f" Compute it with <code>{html.escape(m.command)}</code>" if m.command else ""
            body.append(f'<div class="missing"><strong>Missing:</strong> {html.escape(m.what)}.{cmd}</div>')
        for fig in section.figures:
            index += 1
            body.append(_figure_html(fig, index, for_print=for_print))
        body += [_html_table(t) for t in section.tables]
        css_class = "breaks" if n > 0 else "first"
        parts.append(f'<section id="sec-{_slug(section.key)}" class="{css_class}">{"".join(body)}</section>')
    toc = "".join(f'<li><a href="#sec-{_slug(s.key)}">{html.escape(s.title)}</a></li>' for s in report.sections)
    missing = len(report.missing)
    meta = (
        f"Generated {report.generated_at.strftime('%Y-%m-%d %H:%M UTC')} from {html.escape(report.db)} · "
        f"runs: {html.escape(', '.join(report.runs))} · {len(report.figures)} figures"
        + (f" · {missing} item(s) missing, marked below" if missing else "")
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(report.title)}</title><style>{_CSS}</style>"
        # No MathJax: plotly.py's own switch, so nothing is looked up on a CDN.
        '<script type="text/javascript">window.PlotlyConfig = {MathJaxConfig: "local"};</script>'
        f'<script type="text/javascript">{get_plotlyjs()}</script></head><body>'
        f'<header><h1>{html.escape(report.title)}</h1><p class="meta">{meta}</p></header>'
        f"<nav><h2>Contents</h2><ol>{toc}</ol></nav>{''.join(parts)}</body></html>\n"
    )


# -- files ---------------------------------------------------------------------------------------------------


def _atomic_write(path: Path, data: bytes) -> Path:
    """Write through a temporary file in the same folder, then rename: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_html(report: Report, path: str | Path) -> Path:
    """The self-contained HTML report."""
    return _atomic_write(Path(path), render_html(report).encode("utf-8"))


def find_chromium() -> str | None:
    """Chromium's path: $BROWSER_PATH (kaleido's convention) if set, else `chromium` on PATH or /usr/bin/chromium."""
    wanted = os.environ.get("BROWSER_PATH")
    if wanted:
        return wanted if os.access(wanted, os.X_OK) else None
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    return found or (CHROMIUM if os.access(CHROMIUM, os.X_OK) else None)


def _require_chromium(what: str) -> str:
    browser = find_chromium()
    if browser is None:
        raise ChromiumMissingError(
            f"{what} needs Chromium, which is not installed: run `{INSTALL_CHROMIUM}` "
            "(HTML, Markdown, CSV and Parquet export without it)"
        )
    return browser


def write_pdf(report: Report, path: str | Path, *, timeout: float = 180.0) -> Path:
    """The HTML report printed to PDF by headless Chromium: static figures, one section per page."""
    browser = _require_chromium("PDF export")
    with tempfile.TemporaryDirectory(prefix="cdd-report-") as tmp:
        page = Path(tmp) / "report.html"
        page.write_text(render_html(report, for_print=True), encoding="utf-8")
        pdf = Path(tmp) / "report.pdf"
        cmd = [
            browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync",
            "--disable-background-networking", "--disable-component-update", f"--user-data-dir={Path(tmp) / 'profile'}",
            "--no-pdf-header-footer", "--virtual-time-budget=10000", "--run-all-compositor-stages-before-draw",
            f"--print-to-pdf={pdf}", page.as_uri(),
        ]  # fmt: skip
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"Chromium ({browser}) did not print the PDF within {timeout:.0f} s") from None
        if not pdf.is_file() or not pdf.read_bytes().startswith(b"%PDF"):
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"Chromium ({browser}) printed no PDF (exit {done.returncode}): {last}")
        return _atomic_write(Path(path), pdf.read_bytes())


def render_pngs(report: Report, folder: Path) -> list[Path]:
    """Every figure as a PNG in ``folder`` (NN-key.png), drawn by kaleido in the local Chromium."""
    import kaleido

    browser = _require_chromium("PNG figures")
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{i:02d}-{_slug(f.key)}.png" for i, f in enumerate(report.figures, 1)]

    async def draw() -> None:
        # One browser for all figures; never kaleido's download, and MathJax off (it would come from a CDN).
        async with kaleido.Kaleido(path=browser, mathjax=False) as k:
            for fig, path in zip(report.figures, paths, strict=True):
                height = int(fig.figure.layout.height or 420)
                opts = {"format": "png", "width": PNG_WIDTH, "height": height, "scale": 1}
                path.write_bytes(await k.calc_fig(fig.figure, opts=opts))

    # Its own thread and event loop, so this works inside a running loop too (Streamlit, notebooks).
    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(asyncio.run, draw()).result()
    return paths


def _md_cell(text: str) -> str:
    # Markdown viewers render inline HTML: escape it (quotes need no escaping outside attributes).
    return html.escape(text, quote=False).replace("|", "\\|").replace("\n", " ")


def _md_table(table: ReportTable) -> str:
    header, rows = _cells(table.frame)
    lines = [f"### {_md_cell(table.title)}", ""]
    if table.caption:
        lines += [_md_cell(table.caption), ""]
    lines.append("| " + " | ".join(_md_cell(h) for h in header) + " |")
    lines.append("|" + "|".join("---" for _ in header) + "|")
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def render_markdown(report: Report, figures: dict[str, str] | None, note: str = "") -> str:
    """The report as Markdown; ``figures`` maps a figure key to its PNG's relative path (None: no figures)."""
    out = [f"# {_md_cell(report.title)}", ""]
    out.append(
        f"Generated {report.generated_at.strftime('%Y-%m-%d %H:%M UTC')} from `{report.db}`; "
        f"runs: {_md_cell(', '.join(report.runs))}."
    )
    if note:
        out += ["", f"> {_md_cell(note)}"]
    for section in report.sections:
        out += ["", f"## {_md_cell(section.title)}", ""]
        out += [_md_cell(t) + "\n" for t in section.text]
        for m in section.missing:
            cmd = f" Compute it with `{m.command}`" if m.command else ""
            out.append(f"> **Missing:** {_md_cell(m.what)}.{cmd}\n")
        for fig in section.figures:
            if figures and fig.key in figures:
                out.append(f"![{_md_cell(fig.title)}]({figures[fig.key]})\n")
            else:
                out.append(f"*Figure left out: {_md_cell(fig.title)}*\n")
        out += [_md_table(t) for t in section.tables]
    return "\n".join(out).rstrip() + "\n"


def _markdown_files(report: Report, folder: Path, figure_dir: str) -> tuple[str, list[str]]:
    """Draw the figures into folder/figure_dir; returns the Markdown and notes (why figures are missing)."""
    notes: list[str] = []
    try:
        pngs = render_pngs(report, folder / figure_dir)
        figures = {f.key: f"{figure_dir}/{p.name}" for f, p in zip(report.figures, pngs, strict=True)}
    except ChromiumMissingError as err:
        figures = None
        notes.append(f"figures left out: {err}")
    return render_markdown(report, figures, notes[0] if notes else ""), notes


def write_markdown(report: Report, path: str | Path) -> tuple[Path, list[str]]:
    """``report.md`` and a ``report_figures/`` folder of PNGs beside it; returns the path and notes."""
    path = Path(path)
    figure_dir = f"{path.stem}_figures"
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{path.stem}.", dir=path.parent) as tmp:
        text, notes = _markdown_files(report, Path(tmp), figure_dir)
        target = path.parent / figure_dir
        if (Path(tmp) / figure_dir).is_dir():
            if target.exists():
                shutil.rmtree(target)
            os.replace(Path(tmp) / figure_dir, target)
    _atomic_write(path, text.encode("utf-8"))
    return path, notes


def _data_frame(report: Report) -> pd.DataFrame:
    frame = report.data.copy()
    frame["computed_at"] = pd.to_datetime(frame["computed_at"], errors="coerce")
    frame["n"] = pd.to_numeric(frame["n"], errors="coerce").astype("Int64")
    for column in ("step", "tokens"):
        frame[column] = pd.to_numeric(frame[column], errors="coerce").astype("Int64")
    return frame


def write_data(report: Report, path: str | Path, fmt: str = "csv") -> Path:
    """Every value behind the report with its provenance, as CSV or Parquet (one row per value)."""
    frame = _data_frame(report)
    if fmt == "csv":
        data = frame.to_csv(index=False).encode("utf-8")
    elif fmt == "parquet":
        import io

        buffer = io.BytesIO()
        frame.to_parquet(buffer, index=False, engine="pyarrow")
        data = buffer.getvalue()
    else:
        raise ValueError(f"data format {fmt!r}: use csv or parquet")
    return _atomic_write(Path(path), data)


def write_zip(report: Report, path: str | Path) -> tuple[Path, list[str]]:
    """report.md, figures/*.png, data.csv and the derived tables (tables/*.csv) in one archive."""
    with tempfile.TemporaryDirectory(prefix="cdd-report-") as tmp:
        folder = Path(tmp)
        text, notes = _markdown_files(report, folder, "figures")
        archive = folder / "report.zip"
        with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as z:
            z.writestr("report.md", text)
            for png in sorted((folder / "figures").glob("*.png")):
                z.write(png, f"figures/{png.name}")
            z.writestr("data.csv", _data_frame(report).to_csv(index=False))
            for key, table in report.tables.items():
                z.writestr(f"tables/{key}.csv", table.to_csv(index=False))
        return _atomic_write(Path(path), archive.read_bytes()), notes


@dataclass(frozen=True)
class Exported:
    path: Path
    format: str
    notes: tuple[str, ...] = ()


def format_of(path: str | Path, fmt: str | None = None) -> str:
    """The export format: ``fmt`` if given, else from the file's suffix."""
    if fmt:
        if fmt not in set(FORMATS.values()):
            raise ValueError(f"format {fmt!r}: choose one of {', '.join(sorted(set(FORMATS.values())))}")
        return fmt
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"{path}: cannot tell the format from {suffix or 'no suffix'!r}; use {', '.join(FORMATS)}")
    return FORMATS[suffix]


def export(report: Report, path: str | Path, fmt: str | None = None) -> Exported:
    """Write ``report`` to ``path`` in ``fmt`` (default: from the suffix); returns what was written and notes."""
    fmt = format_of(path, fmt)
    notes: list[str] = []
    if fmt == "html":
        out = write_html(report, path)
    elif fmt == "pdf":
        out = write_pdf(report, path)
    elif fmt == "md":
        out, notes = write_markdown(report, path)
    elif fmt == "zip":
        out, notes = write_zip(report, path)
    else:
        out = write_data(report, path, fmt)
    return Exported(out, fmt, tuple(notes))


def export_bytes(report: Report, fmt: str) -> bytes:
    """The file ``export`` would write, as bytes (for a download button); Markdown comes as a zip."""
    fmt = "zip" if fmt == "md" else fmt
    suffix = {"html": ".html", "pdf": ".pdf", "zip": ".zip", "csv": ".csv", "parquet": ".parquet"}[fmt]
    with tempfile.TemporaryDirectory(prefix="cdd-report-") as tmp:
        target = Path(tmp) / f"report{suffix}"
        export(report, target, fmt)
        return target.read_bytes()
