"""The summary page and the Not computed box: the findings generated from the other sections, what is missing."""

from __future__ import annotations

import pandas as pd

from analysis import divergence as dv
from analysis.report.context import ReportContext, where_data
from analysis.report.model import Finding, Section


def summary_findings(ctx: ReportContext, sections: list[Section]) -> list[Finding]:
    """The summary's headline sentences, each from the analysis a section shows, in the order of the sections.

    "Significant" is used only for what ``analysis.divergence`` tests: windows (family-wise alpha per run) and
    a signal beating the loss (Holm-adjusted alpha).
    """
    out: list[Finding] = []
    if "overview" in ctx.headlines:
        out.append(Finding(ctx.headlines["overview"], "overview"))
    out += _windows_finding(ctx) + _correlation_finding(ctx)
    if "matched" in ctx.headlines:
        out.append(Finding(ctx.headlines["matched"], "matched"))
    out += _ranking_finding(ctx)
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


def _windows_finding(ctx: ReportContext) -> list[Finding]:
    """The divergence windows found (the three strongest named), or that none is significant."""
    o = ctx.options
    windows = ctx.tables.get("windows")
    if windows is None or o.downstream_metric is None:  # the windows table exists only with both metrics
        return []
    nl, ns = ctx.named(o.loss_metric), ctx.named(o.downstream_metric)
    if not len(windows):
        return [
            Finding(
                f"No divergence window in {', '.join(ctx.runs)} at α = {o.alpha:g}: no span of checkpoints where "
                f"{nl} stays flat within {dv.flat_words(o.loss_tol, o.tol_of)} while {ns} improves, or where the "
                f"loss improves while {ns} gets worse, is significant (every span tested, family-wise per run).",
                "windows",
            )
        ]
    top = windows.sort_values("p_adjusted").head(3)
    text = f"{len(windows)} significant divergence window(s) at α = {o.alpha:g} (family-wise per run): "
    text += "; ".join(dv.window_sentences(top, ns, o.x))
    more = len(windows) - len(top)
    return [Finding(text + (f"; {more} more in the windows section." if more else "."), "windows")]


def _correlation_finding(ctx: ReportContext) -> list[Finding]:
    """How the checkpoint-to-checkpoint changes of loss and score correlate, per run, with intervals."""
    corr = ctx.tables.get("correlations")
    if corr is None or not len(corr):
        return []
    parts = []
    for r in corr.itertuples():
        if pd.isna(r.change_spearman):
            continue
        if pd.isna(r.change_lo):
            parts.append(f"{r.run} {r.change_spearman:+.2f} (too few checkpoints where both change for an interval)")
            continue
        verdict = "includes 0: no evidence of a correlation" if r.change_lo <= 0 <= r.change_hi else "excludes 0"
        parts.append(
            f"{r.run} {r.change_spearman:+.2f} (95% interval {r.change_lo:+.2f} to {r.change_hi:+.2f}, {verdict})"
        )
    if not parts:
        return []
    nl, ns = ctx.named(ctx.options.loss_metric), ctx.named(ctx.options.downstream_metric)
    text = f"Spearman correlation of the checkpoint-to-checkpoint changes of {nl} and {ns}: {'; '.join(parts)}."
    return [Finding(text, "curves")]


def _ranking_finding(ctx: ReportContext) -> list[Finding]:
    """The best predictor of the score besides the loss, and whether it beats the loss out of sample."""
    o = ctx.options
    ranking = ctx.tables.get("ranking")
    if ranking is None or not len(ranking):
        return []
    nl, ns = ctx.named(o.loss_metric), ctx.named(o.downstream_metric)
    pooled = ranking[(ranking["run"] == dv.POOLED) & ~ranking["is_loss"].astype(bool)].dropna(subset=["loo_r2"])
    verdict = dv.ranking_verdict(ranking, o.loss_metric)
    if not len(pooled):
        return [Finding(f"No signal besides {nl} to rank as a predictor of {ns}. {verdict}", "ranking")]
    best = pooled.iloc[0]
    # A continuous score of the same task (p_correct, margin, ...) reads the same items: say so, it is no discovery.
    task = str(o.downstream_metric).split("/", 1)[0] + "/"
    same = " (a continuous score of the same task's items)" if str(best["predictor"]).startswith(task) else ""
    text = (
        f"Best predictor of {ns} across the checkpoints of {', '.join(ctx.runs)}: {best['predictor']}{same} "
        f"(leave-one-out R² {best['loo_r2']:.2f}, Spearman {best['spearman']:+.2f}, n = {int(best['n'])}); "
    )
    if pd.notna(best["beats_loss_p"]):
        beats = "beats" if best["beats_loss"] else "does not significantly beat"
        text += f"it {beats} {nl} out of sample (adjusted p = {best['beats_loss_p']:.2g}). {verdict}"
    else:
        text += verdict
    return [Finding(text, "ranking")]


def summary_section(ctx: ReportContext, info: pd.DataFrame, findings: list[Finding]) -> Section:
    """The first page: the runs in brief, what the report analyses, and where all of its data is.

    The findings themselves are drawn by the writers from ``Report.findings``.
    """
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
    s.text.append(where_data(ctx))
    return s


def not_computed_section(sections: list[Section]) -> Section:
    """The one box that lists what every section could not show (the writers draw it from ``Report.missing``)."""
    s = Section("not_computed", "Not computed")
    s.text.append("What the cache does not hold yet for these runs, by section, and the command that computes it.")
    return s
