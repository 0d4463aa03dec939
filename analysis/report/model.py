"""The report model: the options a report is built with and what it holds (sections, figures, tables, findings).

A ``Report`` is what ``build_report`` returns and what every writer (``analysis.report.writers``) reads; nothing
here reads the cache or draws a figure.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

import pandas as pd
import plotly.graph_objects as go

from analysis import divergence as dv


@dataclass(frozen=True)
class ReportOptions:
    """What the report analyses; the defaults are the Divergence and Compare pages' defaults."""

    loss_metric: str | None = None  # None: the page's default (eval/loss, then train/loss, ...)
    downstream_metric: str | None = None  # None: the page's default (an accuracy first, dv.accuracy_first)
    x: str = "step"  # step, tokens or flops
    loss_tol: float = 0.02  # loss counts as flat within this fraction of ...
    tol_of: str = "range"  # ... its range over the run (as the Divergence page), its value, or "absolute"
    alpha: float = 0.05  # chance that a run with no real move gets any window (family-wise)
    levels: int = 8  # matched-loss levels
    log_x: bool = True
    # False: the page budget (about 20 PDF pages whatever the cache holds; long tables go to the data export and
    # the .zip); True: every table in full and a page per section, as before the budget (``report --full``).
    full: bool = False
    # (metric, setting label or params hash) pairs; a metric not named keeps the setting with most checkpoints.
    settings: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.x not in dv.X_AXES:
            raise ValueError(f"x-axis {self.x!r}: choose one of {', '.join(dv.X_AXES)}")
        if self.loss_tol < 0:
            raise ValueError("loss_tol must be >= 0")
        if self.tol_of not in dv.TOL_OF:
            raise ValueError(f"tol_of={self.tol_of!r}: use one of {', '.join(dv.TOL_OF)}")
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha={self.alpha} must be between 0 and 1")
        if self.levels < 1:
            raise ValueError(f"levels={self.levels}: ask for at least one loss level")


@dataclass(frozen=True)
class Missing:
    """Something a section could not show, and the command that computes it."""

    what: str
    command: str | None = None


@dataclass(frozen=True)
class Finding:
    """One headline sentence of the summary, generated from the analysis, and the section that shows it."""

    text: str
    section: str  # the key of the section it links to


@dataclass(frozen=True)
class ReportFigure:
    """A figure of a section, drawn by ``analysis.charts``, with the key its exported file is named by."""

    key: str
    title: str
    figure: go.Figure
    caption: str = ""


@dataclass(frozen=True)
class ReportTable:
    """A printed table of a section (its exported form, whole, is in ``Report.tables`` under the same key)."""

    key: str
    title: str
    frame: pd.DataFrame
    caption: str = ""


@dataclass
class Section:
    """One section of the report: its text, figures and tables, and what it could not show."""

    key: str
    title: str
    text: list[str] = field(default_factory=list)
    figures: list[ReportFigure] = field(default_factory=list)
    tables: list[ReportTable] = field(default_factory=list)
    missing: list[Missing] = field(default_factory=list)
    elsewhere: list[str] = field(default_factory=list)  # what the page budget left to the data export, and where
    new_page: bool = False  # start the section on a new page when printed

    @property
    def has_content(self) -> bool:
        """False for a section with nothing to show but what is missing: it is listed under Not computed."""
        return bool(self.figures or self.tables) or bool(self.text and not self.missing)


@dataclass
class Report:
    """Everything a writer needs: sections in order, the data behind them, and where it came from."""

    title: str
    runs: tuple[str, ...]
    db: str
    generated_at: datetime
    options: ReportOptions  # with the loss and downstream metrics resolved (None when there is none)
    sections: list[Section]
    data: pd.DataFrame  # every cached value of the runs with its provenance (DATA_COLUMNS)
    tables: dict[str, pd.DataFrame]  # the derived tables (windows, matched loss, ranking, ...) by key
    tool_versions: dict[str, str]
    findings: list[Finding] = field(default_factory=list)  # the summary's headline sentences

    @property
    def shown(self) -> list[Section]:
        """The sections a writer prints: those with something to show (the rest are under Not computed)."""

        def shown(s: Section) -> bool:
            return bool(self.missing) if s.key == "not_computed" else s.key == "summary" or s.has_content

        return [s for s in self.sections if shown(s)]

    @property
    def figures(self) -> list[ReportFigure]:
        """Every figure of the report, in section order."""
        return [f for s in self.sections for f in s.figures]

    @property
    def missing(self) -> list[Missing]:
        """Everything the sections could not show, in section order (the Not computed box)."""
        return [m for s in self.sections for m in s.missing]

    def section(self, key: str) -> Section:
        """The section with this key; KeyError naming the keys there are."""
        for s in self.sections:
            if s.key == key:
                return s
        raise KeyError(f"no section {key!r}; sections: {', '.join(s.key for s in self.sections)}")
