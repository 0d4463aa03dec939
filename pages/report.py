"""Report: the selected runs' figures, numbers and provenance as one file to send (HTML, PDF, Markdown, data)."""

from __future__ import annotations

import functools
import re
import shlex

import streamlit as st

from analysis import divergence as dv
from analysis import report as rp
from analysis.report.writers import INSTALL_CHROMIUM
from pages import _state

sel = _state.selection()
st.title("Report")
_state.require_runs(sel)

frame = _state.long_table(sel.runs)
names = _state.metric_names(frame)
losses, scores = dv.loss_metrics(names), dv.downstream_metrics(names)
c1, c2 = st.columns(2)
loss = _state.optional_metric_picker(c1, "Loss", losses, losses, "loss")
score = _state.optional_metric_picker(c2, "Downstream", scores, dv.accuracy_first(scores), "score")
chosen = _state.setting_picker(sel.runs, [loss, score])
full = st.toggle(
    "Every table in full (--full)", key="full", bind="query-params",
    help=f"Off: about {rp.PAGE_BUDGET} PDF pages whatever the cache holds; long tables go to the data export "
    "and the zip (tables/*.csv), and the report says where. On: every table printed, a page per section.",
)  # fmt: skip
report = _state.report(sel.runs, loss, score, sel.x, chosen, full)

st.caption(
    f"{len(report.shown)} sections, {len(report.figures)} figures, "
    f"{sum(len(s.tables) for s in report.shown)} tables, {len(report.data)} values with their provenance. "
    "The file carries the same figures and numbers as the pages and opens without this tool or a network."
)
titles = {s.key: s.title for s in report.shown}
st.subheader("Summary")
for finding in report.findings:
    st.markdown(f"- {_state.md_text(finding.text)} *({titles.get(finding.section, finding.section)})*")
st.subheader("Sections")
for section in report.shown[1:]:
    parts = [f"{len(section.figures)} figure(s)"] if section.figures else []
    parts += [f"{len(section.tables)} table(s)"] if section.tables else []
    parts += [f"{len(section.elsewhere)} left to the export"] if section.elsewhere else []
    status = ":material/check_circle:" if not section.missing else ":material/error:"
    st.markdown(f"{status} **{section.title}**: {', '.join(parts) or 'text only'}")
if report.missing:
    by = [(s.title, m) for s in report.sections for m in s.missing]
    st.warning(
        "Not computed:\n"
        + "\n".join(f"- {t}: {m.what}." + (f" Compute it with `{m.command}`" if m.command else "") for t, m in by)
    )

st.subheader("Download")
base = "report-" + re.sub(r"[^A-Za-z0-9_-]+", "_", "-".join(sel.runs))[:80]
browser = rp.find_chromium()
DOWNLOADS = [  # (format, label, suffix, MIME type, icon, help)
    ("html", "HTML", "html", "text/html", ":material/html:", "One self-contained page; figures stay interactive."),
    ("pdf", "PDF", "pdf", "application/pdf", ":material/picture_as_pdf:", "Printed by Chromium, A4, within budget."),
    ("md", "Markdown (zip)", "zip", "application/zip", ":material/folder_zip:", "report.md, PNG figures, data."),
    ("csv", "CSV", "csv", "text/csv", ":material/table:", "Every value with its provenance, one row each."),
    ("parquet", "Parquet", "parquet", "application/octet-stream", ":material/table:", "The same table as Parquet."),
]
for column, (fmt, label, suffix, mime, icon, tip) in zip(st.columns(len(DOWNLOADS)), DOWNLOADS, strict=True):
    if fmt == "pdf" and not browser:
        continue
    column.download_button(
        label, functools.partial(rp.export_bytes, report, fmt), f"{base}.{suffix}", mime, key=f"dl_{fmt}",
        on_click="ignore", icon=icon, help=tip,
    )  # fmt: skip
if not browser:
    st.info(
        f"PDF export and the Markdown figures need Chromium, which is not installed here: `{INSTALL_CHROMIUM}`. "
        "HTML, CSV and Parquet work without it."
    )

runs = " ".join(f"--run {shlex.quote(r)}" for r in sel.runs)
flags = (f" --loss {shlex.quote(loss)}" if loss else "") + (f" --downstream {shlex.quote(score)}" if score else "")
note = " (there each metric shows its setting with most checkpoints)" if chosen else ""
st.caption(f"The same report from the command line{note}:")
st.code(f"python -m analysis report {runs}{flags} --x {sel.x} --out report.pdf --db {shlex.quote(str(sel.db))}")
