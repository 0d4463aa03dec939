"""Building a report: every section computed from the cache with the functions the pages call.

``build_report(store, runs)`` returns a ``Report``: sections of figures, tables and notes, and one
row per number with its provenance (``Report.data``). Writing it to a file is ``analysis.report.writers``.

The parts live beside this module, one concept each: the report model (``model``), how numbers print
(``formatting``), the shared context and its page budget (``context``), reading the cache (``gather``)
and the sections (``sections/``). Their public names stay importable from here.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from analysis.charts import ChartStyle
from analysis.report.context import (
    MAX_FORECAST_RUNS,
    MAX_PANELS,
    MAX_RANKED,
    MAX_ROWS,
    PAGE_BUDGET,
    PANELS_PER_FIGURE,
    ReportContext,
)
from analysis.report.formatting import fmt_estimate, fmt_number
from analysis.report.gather import DATA_COLUMNS, checked_runs, data_table, read_context, tool_versions
from analysis.report.model import Finding, Missing, Report, ReportFigure, ReportOptions, ReportTable, Section
from analysis.report.sections.cache import provenance_section, results_section, runs_section
from analysis.report.sections.divergence import divergence_sections, matched_section, ranking_section
from analysis.report.sections.forecast import forecast_section
from analysis.report.sections.overview import overview_section
from analysis.report.sections.signals import FLATNESS, PATHWAYS, signal_section
from analysis.report.sections.summary import not_computed_section, summary_findings, summary_section
from analysis.store import Store

__all__ = [
    "DATA_COLUMNS", "FLATNESS", "MAX_FORECAST_RUNS", "MAX_PANELS", "MAX_RANKED", "MAX_ROWS", "PAGE_BUDGET",
    "PANELS_PER_FIGURE", "PATHWAYS", "Finding", "Missing", "Report", "ReportFigure", "ReportOptions", "ReportTable",
    "Section", "build_report", "fmt_estimate", "fmt_number", "tool_versions",
]  # fmt: skip


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
    runs, registered = checked_runs(store, runs)
    got = read_context(store, runs, registered, options or ReportOptions(), style or ChartStyle())
    ctx = got.ctx
    data = data_table(store, runs, got.checkpoints, got.sources)
    ctx.n_values = len(data)
    sections = _analysis_sections(ctx)
    sections.append(runs_section(ctx, got.info))
    sections.append(results_section(ctx))
    versions = tool_versions()
    sections.append(provenance_section(ctx, data, got.checkpoints, got.sources, versions, now))
    findings = summary_findings(ctx, sections)
    sections.insert(0, summary_section(ctx, got.info, findings))
    sections.insert(-1, not_computed_section(sections))
    for section in sections[1:]:
        # A page per section with --full, as before the budget; otherwise sections flow, and the figure-heavy
        # ones and the provenance start a page.
        section.new_page = ctx.options.full or section.key in ("overview", "curves", "provenance")
    return Report(
        title="Checkpoint divergence report: " + ", ".join(runs),
        runs=tuple(runs),
        db=str(store.path),
        generated_at=(now or datetime.now(UTC)).astimezone(UTC),
        options=ctx.options,
        sections=sections,
        data=data,
        tables=ctx.tables,
        tool_versions=versions,
        findings=findings,
    )


def _analysis_sections(ctx: ReportContext) -> list[Section]:
    """The sections that analyse the runs, in the order they print: the dashboard's views, page by page."""
    sections = [overview_section(ctx)]
    sections += divergence_sections(ctx)
    sections.append(matched_section(ctx))
    sections.append(ranking_section(ctx))
    sections.append(forecast_section(ctx))
    sections.append(signal_section(ctx, "flatness", "Flatness", FLATNESS, "hessian_trace,fisher_trace"))
    sections.append(signal_section(ctx, "pathways", "Pathways", PATHWAYS, "pathway_distance,pathway_consistency"))
    return sections
