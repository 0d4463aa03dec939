"""What every page shares: the cache path, the sidebar selection, and cached reads.

Pages import this one module (``from pages import _state``) and call ``_state.<name>``; the names live
in one module per concept next to it, re-exported here:

    _cache     the cache path, the write generation, and every ``st.cache_data`` read with its wrapper
    _sidebar   the page list and setup, the shared sidebar, the selection every page reads
    _status    the status line of work under way, and the page reruns it triggers
    _widgets   metric and setting pickers and their defaults
    _signals   the body of the signal pages (Geometry, Pathways)
    _markdown  escaping user-supplied text for labels, captions and markdown

Only ``_cache`` and ``_status`` hold Streamlit cache decorators. Reads are keyed by the store's write
generation, so a page shows new results as soon as a job commits them, and never holds the database
file open (DuckDB lets no other process open it meanwhile).
"""

from __future__ import annotations

from analysis.divergence.metric_roles import accuracy_first
from pages._cache import (
    Chosen,
    checkpoints,
    correlations,
    db_path,
    divergence,
    generation,
    guarded,
    job_units,
    jobs,
    log_series,
    long_table,
    one_generation_per_run,
    predictor_ranking,
    report,
    runs_table,
    sample_metrics,
    sample_results,
    store,
)
from pages._markdown import md_text
from pages._sidebar import (
    PAGE_CONFIG,
    PAGES,
    PageConfig,
    Selection,
    chosen,
    no_runs_message,
    require_runs,
    select_run_next,
    selection,
    sidebar,
)
from pages._signals import signal_view
from pages._status import REFRESH_SECONDS, work_under_way
from pages._widgets import metric_names, metric_picker, optional_metric_picker, setting_picker

__all__ = [
    "PAGES",
    "PAGE_CONFIG",
    "REFRESH_SECONDS",
    "Chosen",
    "PageConfig",
    "Selection",
    "accuracy_first",
    "checkpoints",
    "chosen",
    "correlations",
    "db_path",
    "divergence",
    "generation",
    "guarded",
    "job_units",
    "jobs",
    "log_series",
    "long_table",
    "md_text",
    "metric_names",
    "metric_picker",
    "no_runs_message",
    "one_generation_per_run",
    "optional_metric_picker",
    "predictor_ranking",
    "report",
    "require_runs",
    "runs_table",
    "sample_metrics",
    "sample_results",
    "select_run_next",
    "selection",
    "setting_picker",
    "sidebar",
    "signal_view",
    "store",
    "work_under_way",
]
