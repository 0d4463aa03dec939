"""Writing a ``Report`` to a file: HTML, PDF, PNG figures, Markdown, CSV / Parquet data and zip.

Every file is written through a temporary name and renamed, so a failed export leaves nothing
half-written. PDF and PNG use the Chromium on this machine; nothing here downloads one.
"""

from __future__ import annotations

import asyncio
import html
import os
import re
import shutil
import subprocess
import tempfile
import uuid
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio

from analysis.report.build import Report, ReportFigure, ReportTable, fmt_number

FORMATS = {
    ".html": "html", ".htm": "html", ".pdf": "pdf", ".md": "md", ".zip": "zip", ".csv": "csv", ".parquet": "parquet",
}  # fmt: skip
CHROMIUM = "/usr/bin/chromium"
INSTALL_CHROMIUM = "apt-get install -y chromium"
# A4 with 12 mm side margins leaves 186 mm = 703 CSS pixels; figures in the PDF are drawn narrower than that.
PRINT_WIDTH = 680
PNG_WIDTH = 1000


class ChromiumMissingError(FileNotFoundError):
    """No Chromium to print a PDF with."""


def _cells(frame: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    header = [str(c) for c in frame.columns]
    rows = [[fmt_number(v) for v in row] for row in frame.itertuples(index=False, name=None)]
    return header, rows


# -- building ------------------------------------------------------------------------------------------------


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
.missing ul { margin: 0.3em 0; padding-left: 1.2em; }
.findings li { margin: 0.35em 0; }
.findings a.to, .elsewhere { color: #59636e; font-size: 0.85em; }
.elsewhere { border-left: 3px solid #d0d7de; padding: 0.2em 0.6em; }
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
  nav { break-after: page; }
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
    shown = report.shown
    titles = {s.key: s.title for s in shown}
    toc = "".join(f'<li><a href="#sec-{_slug(s.key)}">{html.escape(s.title)}</a></li>' for s in shown[1:])
    for section in shown:
        body = [f"<h2>{html.escape(section.title)}</h2>"]
        body += [f"<p>{_text_html(t)}</p>" for t in section.text[:1]]
        if section.key == "summary" and report.findings:
            items = "".join(
                f'<li>{_text_html(f.text)} <a class="to" href="#sec-{_slug(f.section)}">'
                f"→ {html.escape(titles.get(f.section, f.section))}</a></li>"
                for f in report.findings
            )
            body.append(f'<h3>Findings</h3><ul class="findings">{items}</ul>')
        body += [f"<p>{_text_html(t)}</p>" for t in section.text[1:]]
        if section.key == "not_computed":
            body.append(_missing_html(report))
        for fig in section.figures:
            index += 1
            body.append(_figure_html(fig, index, for_print=for_print))
        body += [_html_table(t) for t in section.tables]
        if section.elsewhere:
            listed = "; ".join(html.escape(e) for e in section.elsewhere)
            body.append(f'<p class="elsewhere">Not printed, within the page budget: {listed}.</p>')
        if section.key == "summary":
            body.append(f"<nav><h3>Contents</h3><ol>{toc}</ol></nav>")
        css_class = "breaks" if section.new_page else "flow"
        parts.append(f'<section id="sec-{_slug(section.key)}" class="{css_class}">{"".join(body)}</section>')
    missing = len(report.missing)
    meta = (
        f"Generated {report.generated_at.strftime('%Y-%m-%d %H:%M UTC')} from {html.escape(report.db)} · "
        f"runs: {html.escape(', '.join(report.runs))} · {len(report.figures)} figures"
        + (" · every table in full (--full)" if report.options.full else " · within the page budget")
        + (f" · {missing} item(s) not computed, listed under Not computed" if missing else "")
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(report.title)}</title><style>{_CSS}</style>"
        # No MathJax: plotly.py's own switch, so nothing is looked up on a CDN.
        '<script type="text/javascript">window.PlotlyConfig = {MathJaxConfig: "local"};</script>'
        f'<script type="text/javascript">{get_plotlyjs()}</script></head><body>'
        f'<header><h1>{html.escape(report.title)}</h1><p class="meta">{meta}</p></header>'
        f"{''.join(parts)}</body></html>\n"
    )


_CODE = re.compile(r"`([^`]+)`")


def _text_html(text: str) -> str:
    """Escaped text whose `backticked` commands are set as code."""
    return _CODE.sub(lambda m: f"<code>{m.group(1)}</code>", html.escape(text))


def _missing_html(report: Report) -> str:
    """The Not computed box: every section's missing items in one list, with the commands that compute them."""
    items = []
    for section in report.sections:
        for m in section.missing:
            cmd = f" Compute it with <code>{html.escape(m.command)}</code>" if m.command else ""
            items.append(f"<li><strong>{html.escape(section.title)}</strong>: {html.escape(m.what)}.{cmd}</li>")
    return f'<div class="missing"><ul>{"".join(items)}</ul></div>'


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
    shown = report.shown
    titles = {s.key: s.title for s in shown}
    for section in shown:
        out += ["", f"## {_md_cell(section.title)}", ""]
        out += [_md_cell(t) + "\n" for t in section.text[:1]]
        if section.key == "summary" and report.findings:
            out.append("### Findings\n")
            for f in report.findings:
                title = titles.get(f.section, f.section)
                out.append(f"- {_md_cell(f.text)} ([→ {_md_cell(title)}](#{_md_anchor(title)}))")
            out.append("")
        out += [_md_cell(t) + "\n" for t in section.text[1:]]
        if section.key == "not_computed":
            for s in report.sections:
                for m in s.missing:
                    cmd = f" Compute it with `{m.command}`" if m.command else ""
                    out.append(f"> - **{_md_cell(s.title)}**: {_md_cell(m.what)}.{cmd}")
            out.append("")
        for fig in section.figures:
            if figures and fig.key in figures:
                out.append(f"![{_md_cell(fig.title)}]({figures[fig.key]})\n")
            else:
                out.append(f"*Figure left out: {_md_cell(fig.title)}*\n")
        out += [_md_table(t) for t in section.tables]
        if section.elsewhere:
            out.append(
                "*Not printed, within the page budget: " + "; ".join(_md_cell(e) for e in section.elsewhere) + ".*\n"
            )
    return "\n".join(out).rstrip() + "\n"


def _md_anchor(title: str) -> str:
    """The anchor GitHub-style Markdown viewers give a heading."""
    return re.sub(r"[^a-z0-9 _-]", "", title.lower()).replace(" ", "-")


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
