"""The report context and its page budget: what every section reads, and how much of it a section may print.

``ReportContext`` carries the cache's long table (one setting per metric, as the pages read it), the resolved
options, the runs' colours and the derived tables the sections leave for the export and the summary.
``ReportContext.put`` is the page budget: a long table prints its first rows and says where the rest is.
The ``*_command`` helpers write the command lines a section gives for what the cache does not hold yet.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import overload

import pandas as pd

from analysis.charts import ChartStyle
from analysis.report.model import ReportOptions, ReportTable, Section
from analysis.store import DEFAULT_DB, Store

# The page budget (ReportOptions.full=False): what one section may print before the rest goes to the export.
PAGE_BUDGET = 20  # A4 pages a default PDF should stay within, whatever the cache holds (tests check it)
MAX_ROWS = 20  # rows of a printed table
MAX_PANELS = 30  # overview panels drawn (every task is still listed)
PANELS_PER_FIGURE = 12  # 4 rows of 3: one A4 page with room for a caption
MAX_RANKED = 20  # predictors in the ranking's heatmap and table
MAX_FORECAST_RUNS = 4  # runs with a forecast backtest figure


@dataclass
class ReportContext:
    """What the sections of one report share: the cache, the runs, the options and the tables made so far."""

    store: Store
    runs: list[str]
    options: ReportOptions
    style: ChartStyle
    colors: dict[str, str]
    frame: pd.DataFrame  # the long table, one setting per metric, as the pages read it
    names: list[str]
    settings: pd.DataFrame  # every cached setting of every metric (analysis.settings.settings_table)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    n_values: int = 0  # rows of the data export
    headlines: dict[str, str] = field(default_factory=dict)  # section key -> its headline sentence

    def put(
        self,
        section: Section,
        key: str,
        title: str,
        frame: pd.DataFrame,
        caption: str = "",
        *,
        limit: int = MAX_ROWS,
        printed: pd.DataFrame | None = None,
        whole: bool = False,
    ) -> None:
        """Keep ``frame`` whole for the export (``tables/<key>.csv`` in the .zip) and print it within the budget.

        ``printed`` is the form to print (formatted cells), ``frame`` by default. Under the budget a table longer
        than ``limit`` rows prints its first ``limit`` (none when ``whole`` or ``limit=0``) and says where the rest is.
        """
        self.tables[key] = frame
        printed = frame if printed is None else printed
        limit = 0 if whole and len(printed) > limit else limit
        if self.options.full or len(printed) <= limit:
            section.tables.append(ReportTable(key, title, printed, caption))
        elif limit == 0:
            section.elsewhere.append(f"{title}: {len(printed)} rows, in tables/{key}.csv of the .zip export")
        else:
            note = f"The first {limit} of {len(printed)} rows; all of them are in tables/{key}.csv of the .zip export."
            section.tables.append(ReportTable(key, title, printed.head(limit), f"{caption} {note}".strip()))

    def several(self) -> pd.DataFrame:
        """The settings of the metrics cached under more than one, and which one the report shows."""
        table = self.settings[self.settings["metric"].duplicated(keep=False)]
        shown = set(zip(self.frame.get("metric", []), self.frame.get("params_hash", []), strict=True))
        pairs = zip(table["metric"], table["params_hash"], strict=True)
        table = table.assign(shown=[pair in shown for pair in pairs])
        return table[["metric", "setting", "n_checkpoints", "runs", "shown", "params_hash"]].reset_index(drop=True)

    @overload
    def named(self, metric: str) -> str: ...
    @overload
    def named(self, metric: None) -> None: ...
    def named(self, metric: str | None) -> str | None:
        """``metric`` with its setting beside it (``arc_easy/acc,none (5-shot)``) when several are cached."""
        rows = self.several()
        label = rows.loc[(rows["metric"] == metric) & rows["shown"], "setting"]
        return f"{metric} ({label.iloc[0]})" if metric is not None and len(label) else metric

    def runs_with(self, metric: str | None) -> list[str]:
        """The report's runs that have ``metric`` cached, in the report's order."""
        if metric is None or not len(self.frame):
            return []
        present = set(self.frame.loc[self.frame["metric"] == metric, "run"])
        return [r for r in self.runs if r in present]


# -- the commands a section suggests -------------------------------------------------------------------------


def db_flag(store: Store) -> str:
    """`` --db PATH`` for a cache other than the default one, else nothing."""
    return "" if Path(store.path) == DEFAULT_DB else f" --db {shlex.quote(str(store.path))}"


def eval_command(store: Store, run: str, *, tasks: str | None = None, metrics: str | None = None) -> str:
    """The ``python -m analysis eval`` line that computes ``tasks`` and ``metrics`` for ``run``."""
    parts = [f"python -m analysis eval --run {shlex.quote(run)}"]
    if tasks:
        parts.append(f"--tasks {tasks}")
    if metrics:
        parts.append(f"--metrics {metrics}")
    return " ".join(parts) + db_flag(store)


def runs_flags(ctx: ReportContext) -> str:
    """``--run A --run B`` for the report's runs, quoted for a shell."""
    return " ".join(f"--run {shlex.quote(r)}" for r in ctx.runs)


def where_data(ctx: ReportContext) -> str:
    """Where every value and every table in full are, as one sentence with the commands."""
    base = f"python -m analysis report {runs_flags(ctx)}"
    full = "" if ctx.options.full else "; --full prints every table in this document"
    return (
        f"Every value behind this report ({ctx.n_values} rows, each with its provenance) is in the data export: "
        f"`{base} --out data.csv{db_flag(ctx.store)}` (or data.parquet); `--out report.zip` holds it as data.csv "
        f"beside every table in full (tables/*.csv){full}."
    )
