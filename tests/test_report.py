"""Exported reports on a real cache: HTML parsed, PDF printed by real Chromium and rasterised by pdftoppm,
Markdown figures drawn by kaleido, data read back, the command line, and the Report page in AppTest."""

from __future__ import annotations

import io
import subprocess
import zipfile
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest

from analysis import divergence as dv
from analysis import report as rp
from analysis.store import ResultRow, Store
from tests.browser import require_chromium
from tests.conftest import OUT
from tests.test_app import open_app
from tests.test_cli import cli

# Slow: renders reports through Chromium (PDF, PNG) (`make test-fast` leaves it out).
pytestmark = pytest.mark.slow

SIGNAL_STEPS = (10, 40, 80, 120)


@pytest.fixture
def report_db(divergence_db: Path) -> Path:
    """The divergence fixture (runs grok and stuck) plus a flatness and a pathway metric cached for grok only."""
    rows = [ResultRow("grok", s, "hessian_trace", 100.0 / s, f"fp-grok-{s}", stderr=1.0, n=8) for s in SIGNAL_STEPS]
    rows += [ResultRow("grok", s, "pathway_distance", 3.0 + s / 1000, f"fp-grok-{s}", n=8) for s in SIGNAL_STEPS]
    Store(divergence_db).write_results(rows)
    return divergence_db


class Page(HTMLParser):
    """Everything a test needs from an HTML page: tags, URL attributes, scripts, plotly divs and visible text."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.urls: list[str] = []
        self.scripts: list[str] = []
        self.plotly_divs = 0
        self.text: list[str] = []
        self._in_script = False
        self._in_style = False
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        attrs = dict(attrs)
        self.urls += [v for k, v in attrs.items() if k in ("src", "href") and v]
        if tag == "div" and "plotly-graph-div" in (attrs.get("class") or ""):
            self.plotly_divs += 1
        if tag == "script":
            self._in_script = True
            self.scripts.append("")
        self._in_style = self._in_style or tag == "style"

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_script = False
        if tag == "style":
            self._in_style = False

    def handle_data(self, data):
        if self._in_script:
            self.scripts[-1] += data
        elif not self._in_style:
            self.text.append(data)

    @property
    def visible(self) -> str:
        return " ".join(" ".join(self.text).split())


def test_html_report_is_self_contained_with_every_figure_and_the_stores_numbers(report_db: Path, tmp_path: Path):
    store = Store(report_db)
    report = rp.build_report(store, ["grok", "stuck"])
    keys = [f.key for f in report.figures]
    assert keys == [
        "overview-1", "curves", "trajectory", "matched", "residual", "ranking", "forecast_grok", "forecast_stuck",
        "flatness", "pathways",
    ]  # fmt: skip
    path = rp.write_html(report, tmp_path / "report.html")
    text = path.read_text(encoding="utf-8")
    page = Page(text)

    assert page.plotly_divs == len(report.figures) == 10  # overview, 7 analysis figures, a forecast per run
    assert sum(".newPlot(" in s for s in page.scripts if len(s) < 1_000_000) == 10
    assert sum(len(s) > 1_000_000 for s in page.scripts) == 1  # plotly.js inlined once, not per figure
    assert "link" not in page.tags  # no stylesheet from anywhere
    assert all(u.startswith("#") for u in page.urls), [u for u in page.urls if not u.startswith("#")]
    assert 'MathJaxConfig: "local"' in text and "mathjax" not in " ".join(page.urls).lower()

    visible = page.visible
    windows = report.tables["windows"]
    grok = windows[windows["run"] == "grok"].iloc[0]
    assert (grok["kind"], grok["start"], grok["end"]) == ("grokking", 40, 100)
    assert "grok grokking 40 100 " in visible  # the window's row as printed
    # The matched-loss gap, as the Compare page computes it, appears as its headline.
    matched = dv.matched_loss(store.long_table(["grok", "stuck"]), "train/loss", "toy/acc,none", ["grok", "stuck"])
    pd.testing.assert_frame_equal(report.tables["matched_loss"], matched)
    stuck = matched[matched["run"] == "stuck"]
    best = stuck.loc[stuck["gap"].abs().idxmax()]
    assert best["gap"] == pytest.approx(-0.8, abs=0.05)
    assert f"Largest gap to grok at the same train/loss: {best['gap']:+.3f} ± {best['gap_stderr']:.3f}" in visible
    # The residuals the Compare page shows, last checkpoint of each run: "grok" above the line, 0.8 from "stuck".
    residual = dv.residuals(store.long_table(["grok", "stuck"]), "train/loss", "toy/acc,none")
    last = residual.sort_values("x").groupby("run").tail(1).set_index("run")["residual"]
    assert last["grok"] - last["stuck"] == pytest.approx(0.8, abs=1e-9)
    assert f"the last checkpoints sit at grok {last['grok']:+.3f}, stuck {last['stuck']:+.3f}" in visible
    # Every cached result is printed, and the flatness values with their stderr.
    for row in store.results(["grok", "stuck"]).itertuples():
        assert rp.fmt_number(row.value) in visible
    assert "10 ± 1" in visible and "2.5 ± 1" in visible  # hessian_trace at steps 10 and 40
    # What is missing is said, with the command that computes it.
    for metric in ("hessian_trace", "pathway_distance"):
        command = f"python -m analysis eval --run stuck --metrics {metric} --db {report_db}"
        assert f"run 'stuck' has no {metric}. Compute it with {command}" in visible
    assert visible.count("Compute it with") == len(report.missing) == 2  # all in the one Not computed box
    # Provenance: the checkpoint fingerprint, parameters hash and libraries of the cached values.
    assert "fp-grok-40" in visible and "fp-stuck-120" in visible
    assert store.results(["grok"])["params_hash"].iloc[0] in visible
    assert f"duckdb {rp.tool_versions()['duckdb']}" in visible


def test_names_from_the_store_are_escaped(db: Path, tmp_path: Path) -> None:
    from tests.conftest import synthetic_run

    evil = '<img src=x onerror="alert(1)">'
    run = synthetic_run("x")
    store = Store(db)
    store.register_run(type(run)(evil, f"/runs/{evil}", run.checkpoints, run.log))
    report = rp.build_report(store, [evil])
    text = rp.render_html(report)
    page = Page(text)
    assert "img" not in page.tags
    assert evil in page.visible  # shown as text
    assert sum(evil in s for s in page.scripts) == 0  # and not raw inside a figure's script either


def test_full_pdf_has_a_page_per_section_and_rasterises(report_db: Path, tmp_path: Path) -> None:
    require_chromium()
    report = rp.build_report(Store(report_db), ["grok", "stuck"], rp.ReportOptions(full=True))
    pdf = rp.write_pdf(report, tmp_path / "report.pdf")
    assert pdf.read_bytes().startswith(b"%PDF")
    info = subprocess.run(["pdfinfo", str(pdf)], capture_output=True, text=True, check=True).stdout
    n_pages = int(next(line.split()[1] for line in info.splitlines() if line.startswith("Pages:")))
    text = subprocess.run(["pdftotext", "-layout", str(pdf), "-"], capture_output=True, text=True, check=True).stdout
    pages = text.split("\f")[:n_pages]
    # With --full every section after the first starts a page, in order.
    starts = []
    for section in report.shown[1:]:
        found = [i for i, p in enumerate(pages) if p.strip().startswith(section.title)]
        assert found, f"no page starts with section {section.title!r}"
        starts.append(found[0])
    assert starts == sorted(starts) and len(set(starts)) == len(starts)
    assert n_pages >= len(report.shown)
    assert "Summary" in pages[0] and "Findings" in pages[0] and "Contents" in pages[0]
    windows_page = starts[[s.key for s in report.shown[1:]].index("windows")]
    assert "grok grokking 40 100" in " ".join(pages[windows_page].split())
    # Rasterise (kept under out/tests to look at) and check that the figure pages are not blank.
    out = OUT / "report_pdf"
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("page-*.png"):
        old.unlink()
    subprocess.run(["pdftoppm", "-r", "40", "-png", str(pdf), str(out / "page")], check=True)
    pngs = sorted(out.glob("page-*.png"))
    assert len(pngs) == n_pages
    from PIL import Image

    curves_page = Image.open(pngs[starts[1]]).convert("L")
    assert curves_page.getextrema()[0] < 100  # dark ink: the lines and axes of the figure were drawn


def test_markdown_zip_has_every_figure_as_png_and_the_data(report_db: Path, tmp_path: Path) -> None:
    require_chromium()
    report = rp.build_report(Store(report_db), ["grok", "stuck"])
    done = rp.export(report, tmp_path / "report.zip")
    assert done.format == "zip" and not done.notes
    with zipfile.ZipFile(done.path) as z:
        names = z.namelist()
        markdown = z.read("report.md").decode()
        pngs = [n for n in names if n.startswith("figures/") and n.endswith(".png")]
        assert len(pngs) == len(report.figures)
        assert all(z.read(n).startswith(b"\x89PNG") for n in pngs)
        data = pd.read_csv(io.BytesIO(z.read("data.csv")))
        assert {"tables/windows.csv", "tables/matched_loss.csv", "tables/ranking.csv"} <= set(names)
    assert all(f"]({n})" in markdown for n in pngs)
    assert "## Divergence windows" in markdown and "| grok | grokking | 40 | 100 |" in markdown
    assert len(data) == len(report.data)


def test_without_a_browser_html_and_markdown_export_and_pdf_says_how(
    report_db: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("BROWSER_PATH", str(tmp_path / "no-chromium"))
    report = rp.build_report(Store(report_db), ["grok"])
    target = tmp_path / "report.pdf"
    target.write_bytes(b"the previous report")
    with pytest.raises(rp.ChromiumMissingError, match="apt-get install -y chromium"):
        rp.export(report, target)
    assert target.read_bytes() == b"the previous report"  # a failed export leaves the old file alone
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # and no temporary file
    done = rp.export(report, tmp_path / "report.md")
    assert "apt-get install -y chromium" in done.notes[0]
    markdown = done.path.read_text()
    assert "Figure left out" in markdown and "apt-get install -y chromium" in markdown
    assert rp.export(report, tmp_path / "report.html").path.stat().st_size > 1_000_000


def test_report_of_runs_with_missing_metrics_says_what_is_missing(populated_db: Path, tmp_path: Path) -> None:
    store = Store(populated_db)  # runs alpha and beta: a training loss, no downstream score, no internal metric
    report = rp.build_report(store, ["alpha"])
    missing = {s.key: [m.what for m in s.missing] for s in report.sections}
    assert missing["curves"] == ["no downstream score cached for these runs (lm-eval results)"]
    assert report.section("curves").missing[0].command == (
        f"python -m analysis eval --run alpha --tasks modarith_em,modarith_mc --db {populated_db}"
    )
    assert missing["matched"] == ["needs a loss and a downstream score (see Loss and downstream)"]
    assert "no flatness metrics cached for alpha" in missing["flatness"][0]
    assert missing["results"] == ["run 'alpha' has no computed results"]
    assert not report.figures
    text = rp.render_html(report)
    visible = Page(text).visible
    assert "Loss and downstream : no downstream score cached" in visible  # in the one Not computed box
    assert [s.key for s in report.shown] == ["summary", "runs", "not_computed", "provenance"]  # nothing else to show
    assert "<h2>Not computed</h2>" in text and "<h2>Divergence windows</h2>" not in text
    pd.testing.assert_frame_equal(report.data[report.data["source"] == "log"][["step"]].reset_index(drop=True),
                                  store.log_series("alpha")[["step"]].astype(report.data["step"].dtype))  # fmt: skip


def test_data_export_has_every_value_with_its_provenance(report_db: Path, tmp_path: Path) -> None:
    store = Store(report_db)
    report = rp.build_report(store, ["grok", "stuck"])
    csv = pd.read_csv(rp.export(report, tmp_path / "data.csv").path)
    parquet = pd.read_parquet(rp.export(report, tmp_path / "data.parquet").path)
    assert list(csv.columns) == list(parquet.columns) == rp.DATA_COLUMNS
    n_results = len(store.results(["grok", "stuck"]))
    assert len(parquet) == len(store.log_series(["grok", "stuck"])) + n_results == len(csv)
    row = parquet[(parquet["run"] == "grok") & (parquet["step"] == 40) & (parquet["metric"] == "hessian_trace")]
    assert row["value"].iloc[0] == pytest.approx(2.5) and row["fingerprint"].iloc[0] == "fp-grok-40"
    assert parquet.loc[parquet["source"] == "result", "computed_at"].notna().all()


def test_cli_writes_the_report_and_rejects_an_unknown_run(report_db: Path, tmp_path: Path) -> None:
    out = tmp_path / "sub" / "report.html"
    code, stdout, stderr = cli("report", "--run", "grok", "--run", "stuck", "--out", str(out), "--db", str(report_db))
    assert code == 0, stderr
    assert out.is_file() and f"wrote {out} (html, 10 figures" in stdout
    assert "missing: run 'stuck' has no hessian_trace" in stderr
    code, stdout, stderr = cli("report", "--run", "nope", "--out", str(tmp_path / "x.html"), "--db", str(report_db))
    assert code == 2 and not stdout
    assert stderr.count("\n") == 1 and stderr.startswith("error: unknown run 'nope'") and "grok, stuck" in stderr
    assert not (tmp_path / "x.html").exists()
    code, _, stderr = cli("report", "--run", "grok", "--out", str(tmp_path / "x.docx"), "--db", str(report_db))
    assert code == 2 and "cannot tell the format" in stderr


def test_report_page_previews_and_offers_every_download(report_db: Path, monkeypatch) -> None:
    at = open_app(report_db, monkeypatch, page="pages/report.py")
    assert not at.exception and not at.error
    assert at.title[0].value == "Report"
    assert at.selectbox(key="score").value == "toy/acc,none"
    buttons = [b.proto.label for b in at.get("download_button")]
    assert buttons == ["HTML", "PDF", "Markdown (zip)", "CSV", "Parquet"]
    warnings = [w.value for w in at.warning]
    assert any("run 'stuck' has no hessian_trace" in w for w in warnings)
    assert any("Largest gap to grok" in m.value for m in at.markdown)  # the summary's matched-loss finding
    assert any("significant divergence window" in m.value for m in at.markdown)
    at.toggle(key="full").set_value(True).run()
    assert not at.exception and any("Cached results" in m.value for m in at.markdown)


def test_overview_page_draws_a_panel_per_task_most_moved_first(sweep_db: Path, monkeypatch) -> None:
    import json

    at = open_app(sweep_db, monkeypatch, page="pages/overview.py")
    assert not at.exception and not at.error
    assert at.title[0].value == "Overview"
    spec = json.loads(at.get("plotly_chart")[0].proto.spec)
    titles = [a["text"] for a in spec["layout"]["annotations"]]
    assert len(titles) == 11 and titles[0] == "lambada_openai/acc" and "mmlu/acc (57 subjects) · derived" in titles
    assert any("67 downstream task(s) in 11 panel(s)" in c.value for c in at.caption)
    at.text_input(key="find").set_value("mmlu").run()
    spec = json.loads(at.get("plotly_chart")[0].proto.spec)
    assert [a["text"] for a in spec["layout"]["annotations"]] == ["mmlu/acc (57 subjects) · derived"]


def test_report_shows_one_setting_per_metric_and_names_it(db: Path) -> None:
    from tests.test_app import FIVE_SHOT, ZERO_SHOT, write_two_settings

    store = Store(write_two_settings(db))
    default = rp.build_report(store, ["grok", "stuck"])
    assert default.options.downstream_metric == "toy/acc,none"
    assert "train/loss (top)" in " ".join(default.section("curves").text)  # one setting: nothing to name
    assert "toy/acc,none (0-shot) (bottom)" in " ".join(default.section("curves").text)
    several = default.tables["metric_settings"]
    assert several[["setting", "n_checkpoints", "shown"]].values.tolist() == [
        ["0-shot", 16, True],
        ["5-shot", 8, False],
    ]
    grok = default.section("results").tables[0].frame.set_index("step")["toy/acc,none"]
    assert grok.to_dict() == ZERO_SHOT  # the stored values: the 5-shot ones are not averaged in

    five = rp.build_report(store, ["grok", "stuck"], rp.ReportOptions(settings=(("toy/acc,none", "5-shot"),)))
    assert five.section("results").tables[0].frame.set_index("step")["toy/acc,none"].dropna().to_dict() == FIVE_SHOT
    assert "toy/acc,none (5-shot)" in five.section("matched").text[0]
    with pytest.raises(ValueError, match=r"no setting '3-shot'; choose one of '0-shot', '5-shot'"):
        rp.build_report(store, ["grok"], rp.ReportOptions(settings=(("toy/acc,none", "3-shot"),)))


def test_report_backtests_a_forecast_for_each_run(report_db: Path) -> None:
    from analysis.report import build_report

    report = build_report(Store(report_db), ["grok", "stuck"])
    section = next(s for s in report.sections if s.key == "forecast")
    assert [f.key for f in section.figures] == ["forecast_grok", "forecast_stuck"]
    text = " ".join(section.text)
    assert "stuck: fitted on 5 checkpoints up to step 60; 3 of 3 hidden checkpoints inside their interval" in text
    grok = next(t for t in section.tables if t.key == "forecast_grok").frame
    assert grok["x"].tolist() == [80, 100, 120] and grok["measured"].notna().all()


@pytest.fixture(scope="module")
def sweep_db(tmp_path_factory) -> Path:
    """A published-format sweep: 57 MMLU subjects and 10 other tasks at 27 steps, imported as one run."""
    from tests.published_formats import pythia_wide_sweep

    folder = tmp_path_factory.mktemp("sweep")
    files = pythia_wide_sweep(folder / "files")
    db = folder / "cache.duckdb"
    code, _, stderr = cli("import-evals", str(files), "--run", "pythia-70m", "--db", str(db))
    assert code == 0, stderr
    return db


def _squeezed(text: str) -> str:
    # Names that wrap across lines still match (pdftotext drops the hyphen a line breaks at).
    return "".join(text.split()).replace("-", "")


def test_a_sweep_report_keeps_the_page_budget_shows_every_task_and_exports_every_value(
    sweep_db: Path, tmp_path: Path
) -> None:
    require_chromium()
    store = Store(sweep_db)
    results = store.results("pythia-70m")
    tasks = sorted({m.split("/", 1)[0] for m in results["metric"]} - {"mmlu"})
    assert len(tasks) == 67 and results["step"].nunique() == 27  # 57 MMLU subjects and 10 other tasks
    report = rp.build_report(store, ["pythia-70m"])
    pdf = rp.write_pdf(report, tmp_path / "sweep.pdf")
    info = subprocess.run(["pdfinfo", str(pdf)], capture_output=True, text=True, check=True).stdout
    n_pages = int(next(line.split()[1] for line in info.splitlines() if line.startswith("Pages:")))
    assert 4 <= n_pages <= rp.PAGE_BUDGET, n_pages
    assert pdf.stat().st_size < 3_000_000
    text = subprocess.run(["pdftotext", str(pdf), "-"], capture_output=True, text=True, check=True).stdout
    pages = text.split("\f")[:n_pages]
    assert pages[0].lstrip().startswith("Checkpoint divergence report") and "Findings" in pages[0]

    # The overview: every task named, MMLU's subjects as one derived panel, panels sorted by how much they moved.
    overview = report.section("overview")
    where = next(i for i, p in enumerate(pages) if "Overview of downstream scores" in p and i > 0)
    overview_text = _squeezed(" ".join(pages[where : where + 3]))
    assert [t for t in tasks if _squeezed(t) not in overview_text] == []
    panels = report.tables["overview"]
    assert len(panels) == 11 and panels["moved"].is_monotonic_decreasing
    mmlu = panels.set_index("panel").loc["mmlu/acc,none"]
    assert mmlu["derived"] == "mean of 57 hendrycksTest-* subjects" and mmlu["n_members"] == 57
    assert "mmlu/acc(57subjects)·derived" in overview_text
    assert len(overview.figures) == 1 and sorted(set(report.tables["overview_tasks"]["task"])) == tasks

    # The PDF says where the full tables are, and the CSV holds every value.
    assert "tables/resultspythia70m.csv" in _squeezed(text) and "outdata.csv" in _squeezed(text)
    assert report.section("results").tables == []
    csv = pd.read_csv(rp.export(report, tmp_path / "data.csv").path)
    assert len(csv) == len(results) == 27 * 134
    merged = results.merge(csv, on=["run", "step", "metric", "params_hash"], suffixes=("", "_csv"), validate="1:1")
    assert len(merged) == len(results) and (merged["value"] == merged["value_csv"]).all()
    # --full keeps the old behaviour: every value printed in the results table.
    full = rp.build_report(store, ["pythia-70m"], rp.ReportOptions(full=True))
    table = full.section("results").tables[0].frame
    assert table.shape == (27, 1 + 134) and full.section("results").elsewhere == []


def test_summary_findings_say_what_the_tests_say_and_link_to_their_sections(report_db: Path) -> None:
    store = Store(report_db)
    report = rp.build_report(store, ["grok", "stuck"])
    by_section = {f.section: f.text for f in report.findings}
    shown = [s.key for s in report.shown]
    assert report.shown[0].key == "summary" and set(by_section) <= set(shown)
    windows = report.tables["windows"]
    assert len(windows) == 1  # grok's window; stuck has none
    sentence = dv.window_sentences(windows, "toy/acc,none", "step")[0]
    assert by_section["windows"] == f"1 significant divergence window(s) at α = 0.05 (family-wise per run): {sentence}."
    assert dv.ranking_verdict(report.tables["ranking"], "train/loss") in by_section["ranking"]
    assert by_section["matched"] == report.section("matched").text[1]  # the largest gap, as the section says it
    # "significant" only where analysis.divergence tests something.
    assert [k for k, t in by_section.items() if "significant" in t] in (["windows"], ["windows", "ranking"])
    text = rp.render_html(report)
    for key in by_section:
        assert f'href="#sec-{key}"' in text and f'id="sec-{key}"' in text
    markdown = rp.render_markdown(report, None)
    assert "[→ Divergence windows](#divergence-windows)" in markdown
