"""The forecast section: a backtest per run, the power form fitted on the first two thirds of its checkpoints."""

from __future__ import annotations

from analysis.charts import forecast_figure
from analysis.forecast import ASSUMPTIONS, forecast, score_series
from analysis.report.context import MAX_FORECAST_RUNS, ReportContext
from analysis.report.model import Missing, ReportFigure, Section


def forecast_section(ctx: ReportContext) -> Section:
    """A backtest per run: the power form fitted on the first two thirds of the checkpoints, the rest forecast."""
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
        _backtest(ctx, s, run, score)
    return s


def _backtest(ctx: ReportContext, s: Section, run: str, score: str) -> None:
    """One run's backtest into ``s``: its sentence, figure and table, or what stops it."""
    o = ctx.options
    series = score_series(ctx.frame, run, score, o.x)
    series = series[series["x"] > 0]
    if len(series) < 8:
        s.missing.append(Missing(f"run {run!r} has {len(series)} checkpoints of {score} with x > 0; 8 needed"))
        return
    fit_until = float(series["x"].iloc[(2 * len(series)) // 3 - 1])
    try:
        rows, result = forecast(ctx.frame, run, score, x=o.x, fit_until=fit_until)
    except ValueError as err:
        s.missing.append(Missing(f"run {run!r}: {err}"))
        return
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
