"""Move cached values between machines as Parquet: compute on a cluster, merge into a laptop's cache.

``export_parquet`` writes one Parquet file per table plus ``manifest.json`` (schema version,
row counts, date). ``import_parquet`` merges such a folder into a cache in one transaction:
primary keys decide duplicates, and a row whose key is already cached keeps the local
value. Results computed on weights other than the local checkpoint's (a different
fingerprint) are refused, and so is a folder whose files are missing, corrupt, or disagree
with the manifest: then nothing is written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import duckdb

from analysis.store import SCHEMA_VERSION, Store

FORMAT = "cdd-cache-export"
MANIFEST = "manifest.json"
# Table -> primary key, in the order rows are merged (a checkpoint before its results).
TABLES: dict[str, tuple[str, ...]] = {
    "runs": ("name",),
    "checkpoints": ("run", "step"),
    "log_series": ("run", "step", "metric"),
    "results": ("run", "step", "metric", "params_hash"),
    "sample_results": ("run", "step", "metric", "params_hash", "sample_id"),
}
STAMPS = ("created_at", "updated_at")


@dataclass(frozen=True)
class TableMerge:
    """What importing one table did: rows added, identical rows skipped (timestamps aside), differing kept local."""

    table: str
    added: int
    skipped: int
    kept_local: int


@dataclass(frozen=True)
class ImportReport:
    tables: list[TableMerge]

    @property
    def added(self) -> int:
        return sum(t.added for t in self.tables)

    @property
    def skipped(self) -> int:
        return sum(t.skipped + t.kept_local for t in self.tables)

    def summary(self) -> str:
        parts = [f"{t.table} +{t.added} ({t.skipped} already cached, {t.kept_local} differing kept local)"
                 for t in self.tables]  # fmt: skip
        return f"imported {self.added} rows: " + "; ".join(parts)


def _literal(path: Path) -> str:
    return "'" + str(path).replace("'", "''") + "'"


def export_parquet(store: Store, folder: str | Path, runs: list[str] | None = None) -> dict:
    """Write the cache's tables (or only ``runs``) under ``folder``; returns the manifest."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    with store.snapshot() as con:
        if runs:
            known = {name for (name,) in con.execute("SELECT name FROM runs").fetchall()}
            missing = [r for r in runs if r not in known]
            if missing:
                raise ValueError(f"unknown run {missing[0]!r} in {store.path}; known runs: {', '.join(sorted(known))}")
        for table, key in TABLES.items():
            where = ""
            if runs:
                column = "name" if table == "runs" else "run"
                where = f" WHERE {column} IN ({', '.join(_literal(Path(r)) for r in runs)})"
            order = ", ".join(key)
            query = f"SELECT * FROM {table}{where} ORDER BY {order}"
            con.execute(f"COPY ({query}) TO {_literal(folder / f'{table}.parquet')} (FORMAT parquet)")
            (counts[table],) = con.execute(f"SELECT count(*) FROM ({query})").fetchone()
    manifest = {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "source": str(store.path),
        "runs": sorted(runs) if runs else None,
        "rows": counts,
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: no manifest; point at a folder written by `python -m analysis export`") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: unreadable manifest ({str(err).splitlines()[0]}); export again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: not a cache export manifest (format {FORMAT!r} expected); export again")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(
            f"{path}: schema version {manifest.get('schema_version')!r}, this tool reads {SCHEMA_VERSION}; "
            "export again with the same version of the tool"
        )
    rows = manifest.get("rows")
    if not isinstance(rows, dict) or set(rows) != set(TABLES) or not all(isinstance(v, int) for v in rows.values()):
        raise ValueError(f"{path}: row counts missing or malformed; export again")
    for table in TABLES:
        if not (folder / f"{table}.parquet").is_file():
            raise ValueError(f"{folder / f'{table}.parquet'}: missing; export the whole folder again")
    return manifest


def _stage(con: duckdb.DuckDBPyConnection, folder: Path, table: str, expected_rows: int) -> None:
    """Load one Parquet file into a temporary table and check it against the cache's table and the manifest."""
    path = folder / f"{table}.parquet"
    try:
        con.execute(f"CREATE TEMP TABLE incoming_{table} AS SELECT * FROM read_parquet({_literal(path)})")
    except duckdb.Error as err:
        raise ValueError(f"{path}: not a readable Parquet file ({str(err).splitlines()[0]}); export again") from None
    want = [r[0] for r in con.execute(f"DESCRIBE {table}").fetchall()]
    got = [r[0] for r in con.execute(f"DESCRIBE incoming_{table}").fetchall()]
    if got != want:
        raise ValueError(f"{path}: columns {got} do not match the cache's {table} table {want}; export again")
    (n,) = con.execute(f"SELECT count(*) FROM incoming_{table}").fetchone()
    if n != expected_rows:
        raise ValueError(f"{path}: {n} rows, the manifest says {expected_rows}; export again")


def _refuse_other_weights(con: duckdb.DuckDBPyConnection) -> None:
    """Refuse results (and samples) computed on a checkpoint whose fingerprint is not the local one."""
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


def _merge(con: duckdb.DuckDBPyConnection, table: str, key: tuple[str, ...]) -> TableMerge:
    on = " AND ".join(f"t.{k} = i.{k}" for k in key)
    staged = f"incoming_{table}"
    sql = f"SELECT count(*) FROM {staged} i WHERE EXISTS (SELECT 1 FROM {table} t WHERE {on})"
    (present,) = con.execute(sql).fetchone()
    # Identical means equal in every column but the timestamps of when each cache wrote the row.
    columns = ", ".join(r[0] for r in con.execute(f"DESCRIBE {table}").fetchall() if r[0] not in STAMPS)
    sql = f"SELECT count(*) FROM (SELECT {columns} FROM {staged} INTERSECT SELECT {columns} FROM {table})"
    (identical,) = con.execute(sql).fetchone()
    (before,) = con.execute(f"SELECT count(*) FROM {table}").fetchone()
    con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM {staged} ON CONFLICT DO NOTHING")
    (after,) = con.execute(f"SELECT count(*) FROM {table}").fetchone()
    return TableMerge(table, after - before, identical, present - identical)


def import_parquet(store: Store, folder: str | Path) -> ImportReport:
    """Merge an export folder into the cache in one transaction; see the module docstring."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: no such folder; point at a folder written by `python -m analysis export`")
    manifest = _manifest(folder)
    merged: list[TableMerge] = []
    with store.transaction() as con:
        for table in TABLES:
            _stage(con, folder, table, manifest["rows"][table])
        _refuse_other_weights(con)
        try:
            for table, key in TABLES.items():
                merged.append(_merge(con, table, key))
        except duckdb.ConstraintException as err:
            raise ValueError(
                f"{folder}: rows break the cache's keys ({str(err).splitlines()[0]}); export again"
            ) from None
        for table in TABLES:
            con.execute(f"DROP TABLE incoming_{table}")
    return ImportReport(merged)
