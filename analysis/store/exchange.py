"""Whole tables to and from Parquet: the SQL behind analysis.exchange's export and import-cache.

An export writes every exchange table (or one run's rows) from one read-only snapshot; an import
stages each file in a temporary table, checks it, refuses results computed on other weights, and
merges by primary key in one transaction. Table and column names come only from EXCHANGE_TABLES and
the schema; user text (run names, file paths) only ever reaches these statements as parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import duckdb

from analysis.store.connection import StoreConnection, fetch_row

# The tables export and import-cache move, each with its primary key, in merge order (a checkpoint before
# its results). Table and column names in the exchange SQL come only from here and from the schema.
EXCHANGE_TABLES: dict[str, tuple[str, ...]] = {
    "runs": ("name",),
    "checkpoints": ("run", "step"),
    "log_series": ("run", "step", "metric"),
    "results": ("run", "step", "metric", "params_hash"),
    "sample_results": ("run", "step", "metric", "params_hash", "sample_id"),
}
# When each cache wrote a row: two rows equal in every other column are the same row.
_STAMPS = ("created_at", "updated_at")


@dataclass(frozen=True)
class TableMerge:
    """What importing one table did: rows added, identical rows skipped (timestamps aside), differing kept local."""

    table: str
    added: int
    skipped: int
    kept_local: int


def _exchange_table(table: str) -> str:
    """``table`` when it is one the exchange moves; anything else (user text) is refused before any SQL."""
    if table not in EXCHANGE_TABLES:
        raise ValueError(f"{table!r} is not a table export moves; use one of {', '.join(EXCHANGE_TABLES)}")
    return table


class ExchangeMixin(StoreConnection):
    """The exchange's part of Store: exporting tables to Parquet files and merging them back in."""

    @staticmethod
    def _exchange_select(table: str, runs: list[str] | None) -> tuple[str, list]:
        """The query for one table's exported rows (only ``runs``' rows when given), and its parameters."""
        key = ", ".join(EXCHANGE_TABLES[_exchange_table(table)])
        if not runs:
            return f"SELECT * FROM {table} ORDER BY {key}", []
        column = "name" if table == "runs" else "run"
        return f"SELECT * FROM {table} WHERE {column} IN (SELECT unnest(?)) ORDER BY {key}", [list(runs)]

    def export_tables(self, folder: str | Path, runs: list[str] | None = None) -> dict[str, int]:
        """Write every exchange table (or only ``runs``' rows) to ``folder/<table>.parquet``; rows per table.

        One read-only snapshot, so the files agree with each other. An unknown run name is refused.
        """
        folder = Path(folder)
        counts: dict[str, int] = {}
        with self._snapshot() as con:
            if runs:
                known = {name for (name,) in con.execute("SELECT name FROM runs").fetchall()}
                missing = [r for r in runs if r not in known]
                if missing:
                    raise ValueError(
                        f"unknown run {missing[0]!r} in {self.path}; known runs: {', '.join(sorted(known))}"
                    )
            for table in EXCHANGE_TABLES:
                query, params = self._exchange_select(table, runs)
                con.execute(f"COPY ({query}) TO ? (FORMAT parquet)", [*params, str(folder / f"{table}.parquet")])
                (counts[table],) = fetch_row(con, f"SELECT count(*) FROM ({query})", params)
        return counts

    def import_tables(self, files: dict[str, Path], rows: dict[str, int]) -> list[TableMerge]:
        """Merge one Parquet file per exchange table into the cache, all in one transaction.

        ``rows`` is how many rows each file should hold (the export's manifest). Every file is staged
        and checked (readable, the table's columns, the row count) and results for weights other than
        the local checkpoint's are refused before anything is merged; a refusal writes nothing. Primary
        keys decide duplicates: a row whose key is already cached keeps the local value.
        """
        if set(files) != set(EXCHANGE_TABLES):
            names = ", ".join(sorted(set(files) ^ set(EXCHANGE_TABLES)))
            raise ValueError(f"import needs one file per table {', '.join(EXCHANGE_TABLES)}; not: {names}")
        merged: list[TableMerge] = []
        with self._write() as con:
            for table in EXCHANGE_TABLES:
                self._stage(con, table, Path(files[table]), rows[table])
            self._refuse_other_weights(con)
            try:
                merged = [self._merge(con, table) for table in EXCHANGE_TABLES]
            except duckdb.ConstraintException as err:
                folder = Path(files["runs"]).parent
                raise ValueError(
                    f"{folder}: rows break the cache's keys ({str(err).splitlines()[0]}); export again"
                ) from None
            for table in EXCHANGE_TABLES:
                con.execute(f"DROP TABLE incoming_{table}")
        return merged

    @staticmethod
    def _stage(con: duckdb.DuckDBPyConnection, table: str, path: Path, expected_rows: int) -> None:
        """Load one Parquet file into a temporary table; check it against the cache's table and the manifest."""
        table = _exchange_table(table)
        try:
            con.execute(f"CREATE TEMP TABLE incoming_{table} AS SELECT * FROM read_parquet(?)", [str(path)])
        except duckdb.Error as err:
            raise ValueError(
                f"{path}: not a readable Parquet file ({str(err).splitlines()[0]}); export again"
            ) from None
        want = [r[0] for r in con.execute(f"DESCRIBE {table}").fetchall()]
        got = [r[0] for r in con.execute(f"DESCRIBE incoming_{table}").fetchall()]
        if got != want:
            raise ValueError(f"{path}: columns {got} do not match the cache's {table} table {want}; export again")
        (n,) = fetch_row(con, f"SELECT count(*) FROM incoming_{table}")
        if n != expected_rows:
            raise ValueError(f"{path}: {n} rows, the manifest says {expected_rows}; export again")

    @staticmethod
    def _refuse_other_weights(con: duckdb.DuckDBPyConnection) -> None:
        """Refuse staged results (and samples) computed on a checkpoint whose fingerprint is not the local one."""
        bad = con.execute(
            """SELECT i.run, i.step, i.fingerprint, c.fingerprint, n.fingerprint FROM incoming_results i
               LEFT JOIN checkpoints c USING (run, step) LEFT JOIN incoming_checkpoints n USING (run, step)
               WHERE i.fingerprint IS DISTINCT FROM coalesce(c.fingerprint, n.fingerprint)
               UNION ALL
               SELECT s.run, s.step, n.fingerprint, c.fingerprint, n.fingerprint FROM incoming_sample_results s
               LEFT JOIN checkpoints c USING (run, step) LEFT JOIN incoming_checkpoints n USING (run, step)
               WHERE c.fingerprint IS NOT NULL AND n.fingerprint IS DISTINCT FROM c.fingerprint
               ORDER BY 1, 2 LIMIT 1"""
        ).fetchone()
        if bad is None:
            return
        run, step, theirs, local, _ = bad
        if local is None and theirs is not None:
            raise ValueError(
                f"run {run!r} step {step}: results for a checkpoint the export does not include; nothing imported"
            )
        if local is None:
            raise ValueError(f"run {run!r} step {step}: samples for a checkpoint neither cache knows; nothing imported")
        raise ValueError(
            f"run {run!r} step {step}: the export's results are for other weights (fingerprint {theirs}, "
            f"local {local}); nothing imported"
        )

    @staticmethod
    def _merge(con: duckdb.DuckDBPyConnection, table: str) -> TableMerge:
        """Insert a staged table's rows whose key is new; count the identical and the differing others."""
        table = _exchange_table(table)
        staged = f"incoming_{table}"
        on = " AND ".join(f"t.{k} = i.{k}" for k in EXCHANGE_TABLES[table])
        sql = f"SELECT count(*) FROM {staged} i WHERE EXISTS (SELECT 1 FROM {table} t WHERE {on})"
        (present,) = fetch_row(con, sql)
        # Identical means equal in every column but the timestamps of when each cache wrote the row.
        columns = ", ".join(r[0] for r in con.execute(f"DESCRIBE {table}").fetchall() if r[0] not in _STAMPS)
        sql = f"SELECT count(*) FROM (SELECT {columns} FROM {staged} INTERSECT SELECT {columns} FROM {table})"
        (identical,) = fetch_row(con, sql)
        (before,) = fetch_row(con, f"SELECT count(*) FROM {table}")
        con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM {staged} ON CONFLICT DO NOTHING")
        (after,) = fetch_row(con, f"SELECT count(*) FROM {table}")
        return TableMerge(table, after - before, identical, present - identical)
