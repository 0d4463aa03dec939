"""Exported reports: the dashboard's figures and numbers in one file that opens anywhere, offline.

``build_report(store, runs)`` reads the cache and computes every section with the same functions the
pages call (``analysis.divergence`` and ``analysis.charts``), so a report shows the numbers the pages show.
Writers (``analysis/report/writers.py``) turn a ``Report`` into a file; ``export`` picks one from the
file's suffix:

    .html      one self-contained page: plotly.js inlined once, figures interactive, no network needed
    .pdf       the HTML printed by headless Chromium (mode bar hidden, A4, about 20 pages: see below)
    .md        Markdown beside a folder of PNG figures (rendered by kaleido in the same Chromium)
    .zip       the Markdown, its figures and the data as CSV in one archive
    .csv       every number of the report with its provenance, one row per value
    .parquet   the same table as Parquet

By default a report keeps a page budget whatever the cache holds: a summary page of findings first, every
downstream score as small multiples, long tables cut to their first rows (each says where it is in full: the
data export and tables/*.csv in the .zip); ``ReportOptions(full=True)`` (``report --full``) prints everything.

Nothing here downloads a browser: without Chromium, HTML, CSV and Parquet export as usual, Markdown
exports without figures, and PDF fails with the command that installs Chromium.
"""

from __future__ import annotations

from analysis.report.build import (
    DATA_COLUMNS,
    PAGE_BUDGET,
    Finding,
    Missing,
    Report,
    ReportFigure,
    ReportOptions,
    ReportTable,
    Section,
    build_report,
    fmt_estimate,
    fmt_number,
    tool_versions,
)
from analysis.report.writers import (
    FORMATS,
    ChromiumMissingError,
    Exported,
    export,
    export_bytes,
    find_chromium,
    format_of,
    render_html,
    render_markdown,
    render_pngs,
    write_data,
    write_html,
    write_markdown,
    write_pdf,
    write_zip,
)

__all__ = [
    "DATA_COLUMNS", "FORMATS", "PAGE_BUDGET", "ChromiumMissingError", "Exported", "Finding", "Missing", "Report",
    "ReportFigure", "ReportOptions", "ReportTable", "Section", "build_report", "export", "export_bytes",
    "find_chromium", "fmt_estimate", "fmt_number", "format_of", "render_html", "render_markdown", "render_pngs",
    "tool_versions", "write_data", "write_html", "write_markdown", "write_pdf", "write_zip",
]  # fmt: skip
