"""The internal-signal sections: the flatness and pathway metric families, as the Geometry and Pathways pages."""

from __future__ import annotations

from analysis.charts import curves_figure, small_multiples_figure
from analysis.report.context import ReportContext, eval_command
from analysis.report.formatting import fmt_estimate
from analysis.report.model import Missing, ReportFigure, Section

# The metric families of the Geometry and Pathways pages (pages/geometry.py, pages/pathways.py).
FLATNESS = (
    "hessian_trace", "hessian_top_eigenvalue", "fisher_trace", "adaptive_sharpness",
    "perturbation_sensitivity", "sam_sharpness", "gradient_alignment",
)  # fmt: skip
PATHWAYS = (
    "pathway_distance", "pathway_consistency", "routing_entropy", "expert_load",
    "pathway_distance_chars", "pathway_consistency_normalized",
)  # fmt: skip


def signal_section(ctx: ReportContext, key: str, title: str, family: tuple[str, ...], suggest: str) -> Section:
    """The metrics of ``family`` cached for the runs: drawn per metric, and tabled per checkpoint (mean ± stderr).

    ``suggest`` is the ``--metrics`` list of the command offered when none of the family is cached.
    """
    o = ctx.options
    s = Section(key, title)
    present = [m for m in family if m in ctx.names]
    if not present:
        runs = ", ".join(ctx.runs)
        s.missing.append(
            Missing(
                f"no {title.lower()} metrics cached for {runs} ({', '.join(family)})",
                eval_command(ctx.store, ctx.runs[0], metrics=suggest),
            )
        )
        return s
    s.text.append(f"The {title.lower()} metrics cached for these runs, per checkpoint (mean ± stderr).")
    for metric in present:
        for run in ctx.runs:
            if run not in ctx.runs_with(metric):
                s.missing.append(Missing(f"run {run!r} has no {metric}", eval_command(ctx.store, run, metrics=metric)))
        if o.full:
            fig = curves_figure(ctx.frame, metric, x=o.x, log_x=o.log_x, colors=ctx.colors, style=ctx.style)
            s.figures.append(ReportFigure(f"{key}-{metric}", ctx.named(metric) or metric, fig))
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
