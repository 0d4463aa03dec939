"""The overview section: every downstream score of the runs as small multiples, most moved first."""

from __future__ import annotations

from typing import Any

import pandas as pd

from analysis.charts import small_multiples_figure
from analysis.overview import Overview, moved_sentence, overview
from analysis.report.context import MAX_PANELS, MAX_ROWS, PANELS_PER_FIGURE, ReportContext, eval_command
from analysis.report.formatting import fmt_estimate
from analysis.report.model import Missing, ReportFigure, Section


def overview_section(ctx: ReportContext) -> Section:
    """One panel per task (a group as the mean of its subjects), drawn and tabled within the page budget."""
    o = ctx.options
    s = Section("overview", "Overview of downstream scores")
    view = overview(ctx.frame)
    if not len(view.panels):
        s.missing.append(
            Missing(
                "no downstream score cached for these runs (lm-eval results)",
                eval_command(ctx.store, ctx.runs[0], tasks="modarith_em,modarith_mc"),
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
    s.figures += _panel_figures(ctx, view, drawn)
    ctx.put(s, "overview", "Panels, most moved first", panels, " ".join(_group_notes(view)), printed=_printed(panels))
    return s


def _panel_figures(ctx: ReportContext, view: Overview, drawn: pd.DataFrame) -> list[ReportFigure]:
    """The drawn panels, ``PANELS_PER_FIGURE`` to a figure (one A4 page each)."""
    o = ctx.options
    figures = []
    for start in range(0, len(drawn), PANELS_PER_FIGURE):
        chunk = drawn.iloc[start : start + PANELS_PER_FIGURE]
        titles = [(r.panel, _panel_title(r), bool(r.derived)) for r in chunk.itertuples()]
        fig = small_multiples_figure(
            view.series, titles, x=o.x, log_x=o.log_x, colors=ctx.colors, style=ctx.style, panel_height=190
        )
        n = start // PANELS_PER_FIGURE + 1
        title = "Downstream scores, most moved first" + (f" ({n})" if len(drawn) > PANELS_PER_FIGURE else "")
        figures.append(ReportFigure(f"overview-{n}", title, fig))
    return figures


def _group_notes(view: Overview) -> list[str]:
    """One sentence per task group, printed under the panels' table: what its panel is and how its tasks moved."""
    panels = view.panels
    groups = []
    for row in panels[panels["n_members"] > 1].itertuples():
        # Every subject of a group is named, with how much it moved (the run that moved it most).
        mine = view.members[view.members["panel"] == row.panel]
        mine = mine.sort_values("moved", ascending=False, na_position="last").drop_duplicates("task")
        listed = ", ".join(f"{t.task} {t.change:+.3g}" for t in mine.itertuples())
        what = row.derived or "the group's own score as reported"
        groups.append(f"{_panel_title(row)}: {what}. Its tasks by how much they moved: {listed}.")
    return groups


def _printed(panels: pd.DataFrame) -> pd.DataFrame:
    """The panels' table as printed: the change with its stderr, the move rounded."""
    return pd.DataFrame(
        {
            "panel": panels["panel"],
            "derived": panels["derived"].map(lambda d: d or ""),
            "first": panels["first"],
            "last": panels["last"],
            "change": [fmt_estimate(c, e) for c, e in zip(panels["change"], panels["change_stderr"], strict=True)],
            "moved (stderrs)": panels["moved"].round(1),
        }
    )


def _panel_title(row: Any) -> str:
    """A panel's title: the metric without the ``,none`` filter, and the number of subjects of a group."""
    name = row.panel.removesuffix(",none")
    return name + (f" ({row.n_members} subjects)" if row.n_members > 1 else "")


def _overview_sentence(view: Overview) -> str:
    return moved_sentence(view) + " (an ordering by first-to-last change, not a test)."
