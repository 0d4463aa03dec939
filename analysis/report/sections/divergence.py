"""The divergence sections: loss and downstream, divergence windows, matched-loss comparison, predictor ranking.

They show what the Divergence and Compare pages show, computed by ``analysis.divergence`` on the report's
loss and downstream metrics.
"""

from __future__ import annotations

import pandas as pd

from analysis import divergence as dv
from analysis.charts import (
    loss_downstream_figure,
    matched_loss_figure,
    ranking_heatmap,
    residual_figure,
    trajectory_figure,
)
from analysis.report.context import MAX_RANKED, ReportContext, db_flag, eval_command, runs_flags
from analysis.report.model import Missing, ReportFigure, Section
from analysis.samples import score_items
from analysis.schedule import decay_notes, decay_sentence, run_phases


def needs_pair(ctx: ReportContext, section: Section) -> bool:
    """Record what is missing for the loss/downstream sections; True when they can be drawn."""
    loss, score = ctx.options.loss_metric, ctx.options.downstream_metric
    if loss is None:
        section.missing.append(
            Missing(
                "no loss cached for these runs (a training log with a loss, or heldout_loss)",
                eval_command(ctx.store, ctx.runs[0], metrics="heldout_loss"),
            )
        )
    if score is None:
        section.missing.append(
            Missing(
                "no downstream score cached for these runs (lm-eval results)",
                eval_command(ctx.store, ctx.runs[0], tasks="modarith_em,modarith_mc"),
            )
        )
    if loss is None or score is None:
        return False
    for run in ctx.runs:
        if run not in ctx.runs_with(loss):
            section.missing.append(
                Missing(f"run {run!r} has no {loss}", eval_command(ctx.store, run, metrics="heldout_loss"))
            )
        if run not in ctx.runs_with(score):
            task = score.split("/", 1)[0]
            section.missing.append(Missing(f"run {run!r} has no {score}", eval_command(ctx.store, run, tasks=task)))
    return True


def divergence_sections(ctx: ReportContext) -> list[Section]:
    """Loss and downstream (curves, trajectory, correlations) and the divergence windows found on them."""
    o = ctx.options
    curves = Section("curves", "Loss and downstream")
    windows_section = Section("windows", "Divergence windows")
    loss, score = o.loss_metric, o.downstream_metric
    if not needs_pair(ctx, curves) or loss is None or score is None:  # needs_pair is False when either is None
        windows_section.missing.append(Missing("needs a loss and a downstream score (see the section above)"))
        return [curves, windows_section]
    items = score_items(ctx.store, list(ctx.runs), score, ctx.frame)  # the paired test where items exist
    windows = dv.divergence_windows(
        ctx.frame, loss, score, loss_tol=o.loss_tol, tol_of=o.tol_of, alpha=o.alpha, x=o.x, samples=items
    )
    aligned = dv.align(ctx.frame, loss, score, x=o.x)
    corr = dv.correlations(aligned, loss, [score])
    ctx.tables |= {"windows": windows, "aligned": aligned, "correlations": corr}
    nl, ns = ctx.named(loss), ctx.named(score)  # with the setting beside a metric cached under several

    phases = run_phases(ctx.frame, x=o.x)  # each run's learning-rate warmup and decay, where it logs the rate
    curves.text.append(
        f"{nl} (top) and {ns} (bottom) against {o.x}, one colour per run; shaded spans are the divergence "
        "windows of the next section"
        + (", grey ones the learning-rate warmup and decay named in the legend" if len(phases) else "")
        + ". The second figure follows each run through its checkpoints in the "
        "(loss, score) plane: a vertical stretch is downstream ability changing at constant loss."
    )
    figure = loss_downstream_figure(
        ctx.frame, loss, score, x=o.x, log_x=o.log_x, colors=ctx.colors, style=ctx.style, windows=windows,
        phases=phases,
    )  # fmt: skip
    curves.figures.append(ReportFigure("curves", f"{nl} and {ns}", figure))
    curves.figures.append(
        ReportFigure("trajectory", f"{ns} against {nl}", trajectory_figure(aligned, colors=ctx.colors, style=ctx.style))
    )
    ctx.put(curves, "correlations", "Correlation of loss and downstream across checkpoints", corr, dv.CORRELATION_NOTE)
    points = aligned[["run", "step", "tokens", "left", "right", "right_stderr"]].rename(
        columns={"left": f"{nl} (interpolated)", "right": ns, "right_stderr": "stderr"}
    )
    ctx.put(curves, "checkpoint_scores", "Loss and downstream at each checkpoint", points, whole=True)

    windows_section.text.append(
        dv.windows_caption(windows, ns, o.loss_tol, o.alpha, o.tol_of) + f" start and end are in {o.x} units."
    )
    if len(windows):
        windows_section.text.extend(f"{t}." for t in dv.window_sentences(windows, ns, o.x))
        notes = decay_notes(windows, phases)
        if any(notes):
            windows_section.text.append(decay_sentence(notes))
        ctx.put(windows_section, "windows", "Windows found", windows.assign(lr_schedule=notes))
    return [curves, windows_section]


def matched_section(ctx: ReportContext) -> Section:
    """Each run's score at common loss levels, its gap to the first run, and the residual of score on loss."""
    o = ctx.options
    s = Section("matched", "Matched-loss comparison")
    loss, score = o.loss_metric, o.downstream_metric
    both = [r for r in ctx.runs_with(loss) if r in ctx.runs_with(score)]
    if loss is None or score is None:
        s.missing.append(Missing("needs a loss and a downstream score (see Loss and downstream)"))
        return s
    if len(both) < 2:
        s.missing.append(
            Missing(
                f"needs two runs with both {loss} and {score}; this report has {len(both)}",
                f"python -m analysis report {runs_flags(ctx)} --run OTHER_RUN --out report.html{db_flag(ctx.store)}",
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
    _add_residuals(ctx, s, loss, score)
    return s


def _add_residuals(ctx: ReportContext, s: Section, loss: str, score: str) -> None:
    """The last checkpoints' distance from one line of score on loss fitted to every checkpoint, and its figure."""
    o = ctx.options
    nl, ns = ctx.named(loss), ctx.named(score)
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


def ranking_section(ctx: ReportContext) -> Section:
    """Every cached signal ranked by how well it predicts the downstream score, the loss as the baseline."""
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
                eval_command(ctx.store, ctx.runs[0], metrics="heldout_loss,hessian_trace"),
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
