"""Building a report: every section computed from the cache with the functions the pages call.

``build_report(store, runs)`` returns a ``Report``: sections of figures, tables and notes, and one
row per number with its provenance (``Report.data``). Writing it to a file is ``analysis.report.writers``.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import math
import platform
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from analysis import divergence as dv
from analysis.charts import (
    ChartStyle,
    curves_figure,
    loss_downstream_figure,
    matched_loss_figure,
    ranking_heatmap,
    residual_figure,
    run_colors,
    small_multiples_figure,
    trajectory_figure,
)
from analysis.flops import add_flops_column, store_parameter_counts
from analysis.samples import score_items
from analysis.settings import select_settings, settings_table
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

# The page budget (ReportOptions.full=False): what one section may print before the rest goes to the export.
PAGE_BUDGET = 20  # A4 pages a default PDF should stay within, whatever the cache holds (tests check it)
MAX_ROWS = 20  # rows of a printed table
MAX_PANELS = 30  # overview panels drawn (every task is still listed)
PANELS_PER_FIGURE = 12  # 4 rows of 3: one A4 page with room for a caption
MAX_RANKED = 20  # predictors in the ranking's heatmap and table
MAX_FORECAST_RUNS = 4  # runs with a forecast backtest figure

DATA_COLUMNS = [
    "run", "step", "tokens", "metric", "value", "stderr", "n", "source", "fingerprint", "params_hash", "params",
    "code_version", "lib_versions", "computed_at",
]  # fmt: skip


# -- the report model ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReportOptions:
    """What the report analyses; the defaults are the Divergence and Compare pages' defaults."""

    loss_metric: str | None = None  # None: the page's default (eval/loss, then train/loss, ...)
    downstream_metric: str | None = None  # None: the first lm-eval score
    x: str = "step"  # step, tokens or flops
    loss_tol: float = 0.02  # loss counts as flat within this fraction of its value
    alpha: float = 0.05  # chance that a run with no real move gets any window (family-wise)
    levels: int = 8  # matched-loss levels
    log_x: bool = True
    # False: the page budget (about 20 PDF pages whatever the cache holds; long tables go to the data export and
    # the .zip); True: every table in full and a page per section, as before the budget (``report --full``).
    full: bool = False
    # (metric, setting label or params hash) pairs; a metric not named keeps the setting with most checkpoints.
    settings: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.x not in dv.X_AXES:
            raise ValueError(f"x-axis {self.x!r}: choose one of {', '.join(dv.X_AXES)}")
        if self.loss_tol < 0:
            raise ValueError("loss_tol must be >= 0")
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha={self.alpha} must be between 0 and 1")
        if self.levels < 1:
            raise ValueError(f"levels={self.levels}: ask for at least one loss level")


@dataclass(frozen=True)
class Missing:
    """Something a section could not show, and the command that computes it."""

    what: str
    command: str | None = None


@dataclass(frozen=True)
class Finding:
    """One headline sentence of the summary, generated from the analysis, and the section that shows it."""

    text: str
    section: str  # the key of the section it links to


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
    elsewhere: list[str] = field(default_factory=list)  # what the page budget left to the data export, and where
    new_page: bool = False  # start the section on a new page when printed

    @property
    def has_content(self) -> bool:
        """False for a section with nothing to show but what is missing: it is listed under Not computed."""
        return bool(self.figures or self.tables) or bool(self.text and not self.missing)


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
    findings: list[Finding] = field(default_factory=list)  # the summary's headline sentences

    @property
    def shown(self) -> list[Section]:
        """The sections a writer prints: those with something to show (the rest are under Not computed)."""

        def shown(s: Section) -> bool:
            return bool(self.missing) if s.key == "not_computed" else s.key == "summary" or s.has_content

        return [s for s in self.sections if shown(s)]

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
    raw = store.long_table(runs)
    # One setting per metric, as on the pages: values of different settings are never averaged.
    frame = select_settings(raw, dict(options.settings))
    if options.x == "flops":  # 6 * N * tokens, N read off each run's last checkpoint (analysis.flops)
        frame = add_flops_column(frame, {r: n for r, (n, _, _) in store_parameter_counts(store, runs).items()})
    names = sorted(frame["metric"].unique()) if len(frame) else []
    losses, scores = dv.loss_metrics(names), dv.downstream_metrics(names)
    loss = _pick("loss", options.loss_metric, losses, names)
    score = _pick("downstream", options.downstream_metric, scores, names)
    options = replace(options, loss_metric=loss, downstream_metric=score)
    sources = dict(zip(info["name"], info["source"], strict=True))
    ctx = _Context(store, runs, options, style, colors, frame, names, settings_table(raw))

    data = _data_table(store, runs, checkpoints, sources)
    ctx.n_values = len(data)
    sections = [_overview_section(ctx)]
    sections += _divergence_sections(ctx)
    sections.append(_matched_section(ctx))
    sections.append(_ranking_section(ctx))
    sections.append(_forecast_section(ctx))
    sections.append(_signal_section(ctx, "flatness", "Flatness", FLATNESS, "hessian_trace,fisher_trace"))
    sections.append(_signal_section(ctx, "pathways", "Pathways", PATHWAYS, "pathway_distance,pathway_consistency"))
    sections.append(_runs_section(ctx, info))
    sections.append(_results_section(ctx))
    versions = tool_versions()
    sections.append(_provenance_section(ctx, data, checkpoints, sources, versions, now))
    findings = _findings(ctx, sections)
    sections.insert(0, _summary_section(ctx, info, findings))
    sections.insert(-1, _not_computed_section(sections))
    for section in sections[1:]:
        # A page per section with --full, as before the budget; otherwise sections flow, and the figure-heavy
        # ones and the provenance start a page.
        section.new_page = ctx.options.full or section.key in ("overview", "curves", "provenance")
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
        findings=findings,
    )


@dataclass
class _Context:
    store: Store
    runs: list[str]
    options: ReportOptions
    style: ChartStyle
    colors: dict[str, str]
    frame: pd.DataFrame  # the long table, one setting per metric, as the pages read it
    names: list[str]
    settings: pd.DataFrame  # every cached setting of every metric (analysis.settings.settings_table)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    n_values: int = 0  # rows of the data export
    headlines: dict[str, str] = field(default_factory=dict)  # section key -> its headline sentence

    def put(
        self,
        section: Section,
        key: str,
        title: str,
        frame: pd.DataFrame,
        caption: str = "",
        *,
        limit: int = MAX_ROWS,
        printed: pd.DataFrame | None = None,
        whole: bool = False,
    ) -> None:
        """Keep ``frame`` whole for the export (``tables/<key>.csv`` in the .zip) and print it within the budget.

        ``printed`` is the form to print (formatted cells), ``frame`` by default. Under the budget a table longer
        than ``limit`` rows prints its first ``limit`` (none when ``whole`` or ``limit=0``) and says where the rest is.
        """
        self.tables[key] = frame
        printed = frame if printed is None else printed
        limit = 0 if whole and len(printed) > limit else limit
        if self.options.full or len(printed) <= limit:
            section.tables.append(ReportTable(key, title, printed, caption))
        elif limit == 0:
            section.elsewhere.append(f"{title}: {len(printed)} rows, in tables/{key}.csv of the .zip export")
        else:
            note = f"The first {limit} of {len(printed)} rows; all of them are in tables/{key}.csv of the .zip export."
            section.tables.append(ReportTable(key, title, printed.head(limit), f"{caption} {note}".strip()))

    def several(self) -> pd.DataFrame:
        """The settings of the metrics cached under more than one, and which one the report shows."""
        table = self.settings[self.settings["metric"].duplicated(keep=False)]
        shown = set(zip(self.frame.get("metric", []), self.frame.get("params_hash", []), strict=True))
        pairs = zip(table["metric"], table["params_hash"], strict=True)
        table = table.assign(shown=[pair in shown for pair in pairs])
        return table[["metric", "setting", "n_checkpoints", "runs", "shown", "params_hash"]].reset_index(drop=True)

    def named(self, metric: str | None) -> str | None:
        """``metric`` with its setting beside it (``arc_easy/acc,none (5-shot)``) when several are cached."""
        rows = self.several()
        label = rows.loc[(rows["metric"] == metric) & rows["shown"], "setting"]
        return f"{metric} ({label.iloc[0]})" if metric is not None and len(label) else metric

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
    ctx.put(s, "runs", "Runs", table)
    settings = pd.DataFrame(
        [
            ("loss metric", ctx.named(o.loss_metric) or "(none cached)"),
            ("downstream metric", ctx.named(o.downstream_metric) or "(none cached)"),
            ("x-axis", o.x),
            ("flat loss within (relative)", f"{o.loss_tol:.0%}"),
            ("window false-alarm rate per run (alpha)", fmt_number(o.alpha)),
            ("matched-loss levels", str(o.levels)),
        ],
        columns=["setting", "value"],
    )
    s.tables.append(ReportTable("settings", "Analysis settings", settings))
    several = ctx.several()
    if len(several):
        ctx.put(
            s,
            "metric_settings",
            "Metrics cached under several settings",
            several,
            "A series is one metric under one setting; the report shows one setting of each metric (the one "
            "with most checkpoints unless another was picked) and never averages settings.",
            printed=several.assign(shown=several["shown"].map({True: "shown", False: ""})),
        )
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
    items = score_items(ctx.store, list(ctx.runs), score, ctx.frame)  # the paired test where items exist
    windows = dv.divergence_windows(ctx.frame, loss, score, loss_tol=o.loss_tol, alpha=o.alpha, x=o.x, samples=items)
    aligned = dv.align(ctx.frame, loss, score, x=o.x)
    corr = dv.correlations(aligned, loss, [score])
    ctx.tables |= {"windows": windows, "aligned": aligned, "correlations": corr}
    nl, ns = ctx.named(loss), ctx.named(score)  # with the setting beside a metric cached under several

    curves.text.append(
        f"{nl} (top) and {ns} (bottom) against {o.x}, one colour per run; shaded spans are the divergence "
        "windows of the next section. The second figure follows each run through its checkpoints in the "
        "(loss, score) plane: a vertical stretch is downstream ability changing at constant loss."
    )
    curves.figures.append(
        ReportFigure(
            "curves",
            f"{nl} and {ns}",
            loss_downstream_figure(
                ctx.frame, loss, score, x=o.x, log_x=o.log_x, colors=ctx.colors, style=ctx.style, windows=windows
            ),
        )
    )
    curves.figures.append(
        ReportFigure("trajectory", f"{ns} against {nl}", trajectory_figure(aligned, colors=ctx.colors, style=ctx.style))
    )
    ctx.put(curves, "correlations", "Correlation of loss and downstream across checkpoints", corr, dv.CORRELATION_NOTE)
    points = aligned[["run", "step", "tokens", "left", "right", "right_stderr"]].rename(
        columns={"left": f"{nl} (interpolated)", "right": ns, "right_stderr": "stderr"}
    )
    ctx.put(curves, "checkpoint_scores", "Loss and downstream at each checkpoint", points, whole=True)

    windows_section.text.append(
        dv.windows_caption(windows, ns, o.loss_tol, o.alpha) + f" start and end are in {o.x} units."
    )
    if len(windows):
        windows_section.text.extend(f"{t}." for t in dv.window_sentences(windows, ns, o.x))
        ctx.put(windows_section, "windows", "Windows found", windows)
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
    nl, ns = ctx.named(loss), ctx.named(score)
    s.text.append(
        f"Each run's {ns} at {o.levels} common levels of {nl} (interpolated between the checkpoints that "
        f"first reached each level), and its gap to the reference run {reference}."
    )
    if not len(matched):
        s.text.append("The runs' loss ranges do not overlap, so there is no common loss to compare at.")
        return s
    gaps = matched[matched["run"] != reference]
    best = gaps.loc[gaps["gap"].abs().idxmax()]
    s.text.append(
        f"Largest gap to {reference} at the same {nl}: {best['gap']:+.3f} ± {best['gap_stderr']:.3f} "
        f"({best['run']} at {loss} = {best['loss_level']:.4g}; {dv.better_sign(matched, 'the reference')[1:-1]})."
    )
    ctx.headlines["matched"] = s.text[-1]
    s.figures.append(
        ReportFigure(
            "matched", f"{ns} at matched {nl}", matched_loss_figure(matched, colors=ctx.colors, style=ctx.style)
        )
    )
    ctx.put(s, "matched_loss", "Downstream at matched loss", matched)
    residual = dv.residuals(ctx.frame, loss, score, x=o.x)
    if len(residual):
        last = dv.last_residuals(residual)
        s.text.append(
            f"Against one straight line of {ns} on {nl} fitted to every checkpoint of these runs, the last "
            "checkpoints sit at " + ", ".join(f"{run} {value:+.3f}" for run, value in last.items()) + " (above "
            "zero: more downstream than the loss predicts; a line describes only runs whose score and loss move "
            "together)."
        )
        fig = residual_figure(residual, x=o.x, log_x=o.log_x, colors=ctx.colors, style=ctx.style)
        s.figures.append(ReportFigure("residual", f"{ns} minus what {nl} predicts", fig))
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
        f"Every cached signal ranked by how well it predicts {ctx.named(o.downstream_metric)} across the checkpoints "
        "of all runs pooled: Spearman's rho, and the leave-one-out error of a monotone fit whose direction is chosen "
        "without the held-out point. The loss is the baseline a signal has to beat: beats_loss_p tests a lower "
        "out-of-sample error than the loss's on the same checkpoints, adjusted for the number of signals tried."
    )
    if len(ranking):
        s.text.append(dv.ranking_verdict(ranking, o.loss_metric))
    if not len(ranking):
        s.missing.append(
            Missing(
                "too few checkpoints with both a signal and a downstream score to rank anything (4 needed)",
                _eval_command(ctx.store, ctx.runs[0], metrics="heldout_loss,hessian_trace"),
            )
        )
        return s
    drawn = ranking
    pooled = ranking[ranking["run"] == dv.POOLED]
    if not o.full and len(pooled) > MAX_RANKED:
        # The strongest predictors and the loss; every row is in the table export.
        keep = pooled.head(MAX_RANKED)
        drawn = pd.concat([keep, pooled[pooled["is_loss"].astype(bool) & ~pooled.index.isin(keep.index)]])
        s.text.append(
            f"The figure shows the {MAX_RANKED} strongest of {len(pooled)} signals (and the loss); every one is in "
            "tables/ranking.csv of the .zip export."
        )
    s.figures.append(
        ReportFigure("ranking", "Which signal predicts downstream", ranking_heatmap(drawn, style=ctx.style))
    )
    ctx.put(s, "ranking", "Predictors, strongest first", ranking, limit=MAX_RANKED)
    return s


def _forecast_section(ctx: _Context) -> Section:
    """A backtest per run: the power form fitted on the first two thirds of the checkpoints, the rest forecast."""
    from analysis.charts import forecast_figure
    from analysis.forecast import ASSUMPTIONS, forecast, score_series

    o = ctx.options
    s = Section("forecast", "Forecast backtest")
    score = o.downstream_metric
    if score is None:
        s.missing.append(Missing("needs a downstream score (see above)"))
        return s
    s.text.append(
        f"For each run, {ctx.named(score)} fitted on its first two thirds of checkpoints with the power form "
        f"({ASSUMPTIONS['power']}) and forecast at the rest, with 90% prediction intervals (delta method, t "
        "quantile). Hidden checkpoints whose measurement falls inside its interval count as covered."
    )
    for i, run in enumerate(ctx.runs):
        if not o.full and i == MAX_FORECAST_RUNS:
            s.elsewhere.append(
                f"the backtests of the other {len(ctx.runs) - i} run(s): in the report with --full, or of fewer runs"
            )
            break
        series = score_series(ctx.frame, run, score, o.x)
        series = series[series["x"] > 0]
        if len(series) < 8:
            s.missing.append(Missing(f"run {run!r} has {len(series)} checkpoints of {score} with x > 0; 8 needed"))
            continue
        fit_until = float(series["x"].iloc[(2 * len(series)) // 3 - 1])
        try:
            rows, result = forecast(ctx.frame, run, score, x=o.x, fit_until=fit_until)
        except ValueError as err:
            s.missing.append(Missing(f"run {run!r}: {err}"))
            continue
        covered = int(rows["covered"].astype(bool).sum())
        s.text.append(
            f"{run}: fitted on {int(rows['n_fit'].iloc[0])} checkpoints up to {o.x} {fit_until:g}; "
            f"{covered} of {len(rows)} hidden checkpoints inside their interval; median absolute error "
            f"{rows['abs_error'].median():.3g}" + ("" if result.converged else " (the fit did not converge)") + "."
        )
        color = ctx.colors.get(run, "#0072B2")
        fig = forecast_figure(series, rows, result, x=o.x, log_x=o.log_x, color=color, style=ctx.style)
        s.figures.append(ReportFigure(f"forecast_{run}", f"{run}: forecast of {ctx.named(score)}", fig))
        ctx.put(s, f"forecast_{run}", f"{run}: forecasts at the hidden checkpoints", rows)
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
        if o.full:
            fig = curves_figure(ctx.frame, metric, x=o.x, log_x=o.log_x, colors=ctx.colors, style=ctx.style)
            s.figures.append(ReportFigure(f"{key}-{metric}", ctx.named(metric), fig))
    if not o.full:
        # One panel per metric, as the overview draws scores: a page for the family instead of one per metric.
        series = ctx.frame[ctx.frame["metric"].isin(present)].assign(panel=lambda f: f["metric"])
        panels = [(m, ctx.named(m) or m, False) for m in present]
        fig = small_multiples_figure(series, panels, x=o.x, log_x=o.log_x, colors=ctx.colors, style=ctx.style, cols=2)
        s.figures.append(ReportFigure(key, f"{title} metrics", fig))
    rows = ctx.frame[ctx.frame["metric"].isin(present)]
    rows = rows.groupby(["run", "step", "metric"], as_index=False).agg(
        tokens=("tokens", "min"), value=("value", "first"), stderr=("stderr", "first")
    )
    rows["estimate"] = [fmt_estimate(v, e) for v, e in zip(rows["value"], rows["stderr"], strict=True)]
    table = rows.pivot_table(index=["run", "step"], columns="metric", values="estimate", aggfunc="first")
    table = table.reindex(columns=present).reset_index()
    table.columns.name = None
    ctx.put(s, key, f"{title} metrics per checkpoint", rows.drop(columns="estimate"), printed=table, whole=True)
    return s


def _results_section(ctx: _Context) -> Section:
    s = Section("results", "Cached results")
    s.text.append(
        "Every computed value of each run, per checkpoint, each metric under one setting (named in Runs and "
        "settings where several are cached; values of different settings are never averaged). The data export "
        "(CSV or Parquet) has every setting's values."
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
        table = mine.pivot_table(index="step", columns="metric", values="value", aggfunc="first").reset_index()
        table.columns.name = None
        narrow = table.shape[1] <= 12  # printed whole or not at all
        ctx.put(s, f"results-{run}", f"{run}", table, limit=MAX_ROWS if narrow else 0, whole=True)
    if s.elsewhere:
        s.text[0] = (
            f"{len(results)} computed values of {results['metric'].nunique()} metrics: too many to print within the "
            "page budget. " + _where_data(ctx)
        )
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
        rows = pd.DataFrame(rows)
        printed = rows
        if not ctx.options.full and len(rows) > MAX_ROWS:
            # One row per run, version and libraries (metrics counted) instead of one per metric.
            keys = ["run", "version", "libraries"]
            printed = rows.groupby(keys, as_index=False, sort=True).agg(
                metrics=("metric", "size"),
                params_hashes=("params hash", "nunique"),
                computed_at=("computed at", lambda c: f"{min(c)[:19]} to {max(c)[-19:]}"),
            )
        ctx.put(s, "provenance_results", "Computed values", rows, printed=printed)
        params = results.drop_duplicates("params_hash")[["params_hash", "params"]]
        params = params.rename(columns={"params_hash": "params hash"}).sort_values("params hash")
        caption = "The parameters behind each params hash."
        # Parameter sets are long JSON: printed when a few, else only exported.
        ctx.put(s, "parameters", "Parameter sets", params, caption, limit=MAX_ROWS // 2, whole=True)
    logs = data[data["source"] == "log"]
    if len(logs):
        table = logs.groupby(["run", "metric"], as_index=False).agg(steps=("step", _span))
        table["from"] = table["run"].map(lambda r: f"training log of {sources.get(r, '?')}")
        ctx.put(s, "provenance_logs", "Logged values", table.rename(columns={"steps": "steps (count)"}))
    if len(checkpoints):
        table = checkpoints[["run", "step", "tokens", "fingerprint", "path"]]
        ctx.put(s, "checkpoints", "Checkpoints", table, whole=True)
    generated = (now or datetime.now(UTC)).astimezone(UTC)
    about = [("generated", generated.strftime("%Y-%m-%d %H:%M:%S UTC")), ("cache file", str(ctx.store.path))]
    about += [(name, version) for name, version in versions.items()]
    s.tables.append(ReportTable("about", "This report", pd.DataFrame(about, columns=["item", "value"])))
    return s


# -- the budgeted report's own sections ---------------------------------------------------------------------


def _runs_flags(ctx: _Context) -> str:
    return " ".join(f"--run {shlex.quote(r)}" for r in ctx.runs)


def _where_data(ctx: _Context) -> str:
    """Where every value and every table in full are, as one sentence with the commands."""
    base = f"python -m analysis report {_runs_flags(ctx)}"
    full = "" if ctx.options.full else "; --full prints every table in this document"
    return (
        f"Every value behind this report ({ctx.n_values} rows, each with its provenance) is in the data export: "
        f"`{base} --out data.csv{_db_flag(ctx.store)}` (or data.parquet); `--out report.zip` holds it as data.csv "
        f"beside every table in full (tables/*.csv){full}."
    )


def _panel_title(row) -> str:
    name = row.panel.removesuffix(",none")
    return name + (f" ({row.n_members} subjects)" if row.n_members > 1 else "")


def _overview_section(ctx: _Context) -> Section:
    from analysis.overview import overview

    o = ctx.options
    s = Section("overview", "Overview of downstream scores")
    view = overview(ctx.frame)
    if not len(view.panels):
        s.missing.append(
            Missing(
                "no downstream score cached for these runs (lm-eval results)",
                _eval_command(ctx.store, ctx.runs[0], tasks="modarith_em,modarith_mc"),
            )
        )
        return s
    ctx.tables["overview_tasks"] = view.members
    ctx.headlines["overview"] = _overview_sentence(view)
    panels = view.panels
    drawn = panels if o.full else panels.head(MAX_PANELS)
    s.text.append(
        f"Every downstream score of these runs against {o.x}: one panel per task (its primary metric: acc, else "
        "acc_norm, exact_match, ...; its other metrics are in the data), a task group as one panel of its mean "
        "(dashed, marked derived when the mean was computed from the subjects rather than reported by lm-eval). "
        "Shared x, free y, ±1 stderr bands, one colour per run. Panels are sorted by how far a run moved from its "
        "first to its last checkpoint, in stderrs of that change (improvement positive): an ordering, not a test."
    )
    if len(drawn) < len(panels):
        s.text.append(
            f"The figures draw the {len(drawn)} panels that moved most of {len(panels)}; the table lists the first "
            f"{MAX_ROWS}, and tables/overview.csv of the .zip export has every one."
        )
    for start in range(0, len(drawn), PANELS_PER_FIGURE):
        chunk = drawn.iloc[start : start + PANELS_PER_FIGURE]
        titles = [(r.panel, _panel_title(r), bool(r.derived)) for r in chunk.itertuples()]
        fig = small_multiples_figure(
            view.series, titles, x=o.x, log_x=o.log_x, colors=ctx.colors, style=ctx.style, panel_height=190
        )
        n = start // PANELS_PER_FIGURE + 1
        title = "Downstream scores, most moved first" + (f" ({n})" if len(drawn) > PANELS_PER_FIGURE else "")
        s.figures.append(ReportFigure(f"overview-{n}", title, fig))
    groups = []  # printed under the panels' table, after the figures
    for row in panels[panels["n_members"] > 1].itertuples():
        # Every subject of a group is named, with how much it moved (the run that moved it most).
        mine = view.members[view.members["panel"] == row.panel]
        mine = mine.sort_values("moved", ascending=False, na_position="last").drop_duplicates("task")
        listed = ", ".join(f"{t.task} {t.change:+.3g}" for t in mine.itertuples())
        what = row.derived or "the group's own score as reported"
        groups.append(f"{_panel_title(row)}: {what}. Its tasks by how much they moved: {listed}.")
    printed = pd.DataFrame(
        {
            "panel": panels["panel"],
            "derived": panels["derived"].map(lambda d: d or ""),
            "first": panels["first"],
            "last": panels["last"],
            "change": [fmt_estimate(c, e) for c, e in zip(panels["change"], panels["change_stderr"], strict=True)],
            "moved (stderrs)": panels["moved"].round(1),
        }
    )
    ctx.put(s, "overview", "Panels, most moved first", panels, " ".join(groups), printed=printed)
    return s


def _overview_sentence(view) -> str:
    from analysis.overview import moved_sentence

    return moved_sentence(view) + " (an ordering by first-to-last change, not a test)."


def _findings(ctx: _Context, sections: list[Section]) -> list[Finding]:
    """The summary's headline sentences, each from the analysis a section shows, in the order of the sections.

    "Significant" is used only for what ``analysis.divergence`` tests: windows (family-wise alpha per run) and
    a signal beating the loss (Holm-adjusted alpha).
    """
    o = ctx.options
    out: list[Finding] = []
    runs = ", ".join(ctx.runs)
    if "overview" in ctx.headlines:
        out.append(Finding(ctx.headlines["overview"], "overview"))
    nl, ns = ctx.named(o.loss_metric), ctx.named(o.downstream_metric)
    windows = ctx.tables.get("windows")
    if windows is not None:
        if not len(windows):
            out.append(
                Finding(
                    f"No divergence window in {runs} at α = {o.alpha:g}: no span of checkpoints where {nl} stays "
                    f"flat within {o.loss_tol:.0%} while {ns} improves, or where the loss improves while {ns} gets "
                    "worse, is significant (every span tested, family-wise per run).",
                    "windows",
                )
            )
        else:
            top = windows.sort_values("p_adjusted").head(3)
            text = f"{len(windows)} significant divergence window(s) at α = {o.alpha:g} (family-wise per run): "
            text += "; ".join(dv.window_sentences(top, ns, o.x))
            more = len(windows) - len(top)
            out.append(Finding(text + (f"; {more} more in the windows section." if more else "."), "windows"))
    corr = ctx.tables.get("correlations")
    if corr is not None and len(corr):
        parts = [
            f"{r.run} {r.change_spearman:+.2f} (95% interval {r.change_lo:+.2f} to {r.change_hi:+.2f})"
            for r in corr.itertuples()
            if pd.notna(r.change_spearman)
        ]
        if parts:
            out.append(
                Finding(
                    f"Checkpoint-to-checkpoint changes of {nl} and {ns} correlate (Spearman): {'; '.join(parts)}.",
                    "curves",
                )
            )
    if "matched" in ctx.headlines:
        out.append(Finding(ctx.headlines["matched"], "matched"))
    ranking = ctx.tables.get("ranking")
    if ranking is not None and len(ranking):
        pooled = ranking[(ranking["run"] == dv.POOLED) & ~ranking["is_loss"].astype(bool)].dropna(subset=["loo_r2"])
        verdict = dv.ranking_verdict(ranking, o.loss_metric)
        if len(pooled):
            best = pooled.iloc[0]
            text = (
                f"Best predictor of {ns} across the checkpoints of {runs}: {best['predictor']} (leave-one-out "
                f"R² {best['loo_r2']:.2f}, Spearman {best['spearman']:+.2f}, n = {int(best['n'])}); "
            )
            if pd.notna(best["beats_loss_p"]):
                beats = "beats" if best["beats_loss"] else "does not significantly beat"
                text += f"it {beats} {nl} out of sample (adjusted p = {best['beats_loss_p']:.2g}). {verdict}"
            else:
                text += verdict
            out.append(Finding(text, "ranking"))
        else:
            out.append(Finding(f"No signal besides {nl} to rank as a predictor of {ns}. {verdict}", "ranking"))
    forecast = next((sec for sec in sections if sec.key == "forecast"), None)
    if forecast is not None and forecast.figures:
        out.append(Finding("Forecast backtest, " + " ".join(forecast.text[1:]), "forecast"))
    missing = [sec.title for sec in sections if sec.missing]
    if missing:
        n = sum(len(sec.missing) for sec in sections)
        out.append(
            Finding(f"{n} item(s) not computed yet, each with the command that computes it: {', '.join(missing)}.",
                    "not_computed")
        )  # fmt: skip
    return out


def _summary_section(ctx: _Context, info: pd.DataFrame, findings: list[Finding]) -> Section:
    s = Section("summary", "Summary")
    counts = ctx.frame.groupby("run")["metric"].nunique() if len(ctx.frame) else pd.Series(dtype=int)
    spans = zip(info["first_step"], info["last_step"], strict=True)
    table = pd.DataFrame(
        {
            "run": info["name"],
            "checkpoints": info["checkpoints"],
            "steps": [f"{a}–{b}" if pd.notna(a) else "–" for a, b in spans],
            "metrics": [int(counts.get(r, 0)) for r in info["name"]],
            "source": info["source"],
        }
    )  # fmt: skip
    o = ctx.options
    s.text.append(
        f"{len(ctx.runs)} run(s); loss {ctx.named(o.loss_metric) or '(none cached)'}, downstream score "
        f"{ctx.named(o.downstream_metric) or '(none cached)'}, against {o.x}. The findings below are generated "
        "from the sections they link to; significant means what those sections' tests mean (α stated with each)."
    )
    ctx.put(s, "summary_runs", "Runs", table, limit=8)
    s.text.append(_where_data(ctx))
    return s


def _not_computed_section(sections: list[Section]) -> Section:
    """The one box that lists what every section could not show (the writers draw it from ``Report.missing``)."""
    s = Section("not_computed", "Not computed")
    s.text.append("What the cache does not hold yet for these runs, by section, and the command that computes it.")
    return s
