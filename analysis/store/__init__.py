"""The DuckDB cache: schema, migrations, and every SQL statement of the project.

DuckDB 2.0 lets no second process open a database file, not even read-only, while one
process holds it open. So nothing keeps the file open: every call opens it, does its work
in one transaction, and closes it, retrying for a bounded time when another process holds
the lock. Long computations happen outside; each checkpoint's results are written in one
short transaction, so a crash never leaves half of them visible.

Tables (schema version 2):

    runs           name, source, config (JSON), trust_remote_code
    checkpoints    (run, step) -> tokens, path, fingerprint, revision
    log_series     (run, step, metric) -> tokens, value           training-log curves
    results        (run, step, metric, params_hash) -> value, stderr, n, params, versions,
                   converged (NULL unless the estimate is iterative), higher_is_better (NULL unless declared)
    sample_results (run, step, metric, params_hash, sample_id) -> value, record (JSON)
    jobs, job_units                                                 the job queue
    meta           key -> value (the schema version, the write generation)

One module per concept; Store is composed of their parts and this package re-exports every public name:

    connection.py  opening the file: threads' turns, retry on a lock, the write transaction, checked reads
    schema.py      the migrations and the schema version
    runs.py        runs, checkpoints and logged series
    results.py     results and per-sample records: the row types, writing a unit, reading them back
    jobs.py        the job queue: jobs, units and their progress
    exchange.py    whole tables to and from Parquet (export, import-cache)
"""

from __future__ import annotations

from analysis.store.connection import DEFAULT_DB, StoreLockedError
from analysis.store.exchange import EXCHANGE_TABLES, ExchangeMixin, TableMerge
from analysis.store.jobs import JOB_STATES, JobRecord, JobsMixin, UnitUpdate
from analysis.store.results import (
    LONG_COLUMNS,
    RESULT_COLUMNS,
    ResultRow,
    ResultsMixin,
    SampleRow,
    library_versions,
    params_hash,
)
from analysis.store.runs import RegisterReport, RunsMixin
from analysis.store.schema import MIGRATIONS, SCHEMA_VERSION


class Store(RunsMixin, ResultsMixin, JobsMixin, ExchangeMixin):
    """A handle on one cache file. Holds only the path: every method opens and closes."""


__all__ = [
    "DEFAULT_DB",
    "EXCHANGE_TABLES",
    "JOB_STATES",
    "LONG_COLUMNS",
    "MIGRATIONS",
    "RESULT_COLUMNS",
    "SCHEMA_VERSION",
    "JobRecord",
    "RegisterReport",
    "ResultRow",
    "SampleRow",
    "Store",
    "StoreLockedError",
    "TableMerge",
    "UnitUpdate",
    "library_versions",
    "params_hash",
]
