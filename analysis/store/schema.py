"""The cache's schema: the migrations that build it, the version they reach, and applying them.

Each migration is a list of statements that brings a file from schema version i to i + 1; a file
records its version in the ``meta`` table, so an old cache upgrades in place and a newer one is refused.
"""

from __future__ import annotations

from pathlib import Path

import duckdb

# Each migration brings the schema from version i to i + 1. Never edit a released one:
# append a new one instead, so old cache files upgrade in place.
MIGRATIONS: list[list[str]] = [
    [
        """CREATE TABLE meta (key VARCHAR PRIMARY KEY, value BIGINT NOT NULL)""",
        """CREATE TABLE runs (
            name VARCHAR PRIMARY KEY,
            source VARCHAR NOT NULL,
            config VARCHAR NOT NULL DEFAULT '{}',
            trust_remote_code BOOLEAN NOT NULL DEFAULT FALSE,
            created_at TIMESTAMP NOT NULL DEFAULT current_timestamp,
            updated_at TIMESTAMP NOT NULL DEFAULT current_timestamp)""",
        """CREATE TABLE checkpoints (
            run VARCHAR NOT NULL,
            step BIGINT NOT NULL,
            tokens BIGINT,
            path VARCHAR NOT NULL,
            fingerprint VARCHAR NOT NULL,
            revision VARCHAR,
            PRIMARY KEY (run, step))""",
        """CREATE TABLE log_series (
            run VARCHAR NOT NULL,
            step BIGINT NOT NULL,
            tokens BIGINT,
            metric VARCHAR NOT NULL,
            value DOUBLE NOT NULL,
            PRIMARY KEY (run, step, metric))""",
        """CREATE TABLE results (
            run VARCHAR NOT NULL,
            step BIGINT NOT NULL,
            metric VARCHAR NOT NULL,
            params_hash VARCHAR NOT NULL,
            fingerprint VARCHAR NOT NULL,
            value DOUBLE,
            stderr DOUBLE,
            n BIGINT,
            params VARCHAR NOT NULL DEFAULT '{}',
            code_version VARCHAR NOT NULL DEFAULT '',
            lib_versions VARCHAR NOT NULL DEFAULT '{}',
            created_at TIMESTAMP NOT NULL DEFAULT current_timestamp,
            PRIMARY KEY (run, step, metric, params_hash))""",
        """CREATE TABLE sample_results (
            run VARCHAR NOT NULL,
            step BIGINT NOT NULL,
            metric VARCHAR NOT NULL,
            params_hash VARCHAR NOT NULL,
            sample_id VARCHAR NOT NULL,
            value DOUBLE,
            record VARCHAR NOT NULL DEFAULT '{}',
            PRIMARY KEY (run, step, metric, params_hash, sample_id))""",
        """CREATE TABLE jobs (
            id BIGINT PRIMARY KEY,
            run VARCHAR NOT NULL,
            spec VARCHAR NOT NULL,
            status VARCHAR NOT NULL DEFAULT 'queued',
            message VARCHAR NOT NULL DEFAULT '',
            worker_pid BIGINT,
            created_at TIMESTAMP NOT NULL DEFAULT current_timestamp,
            updated_at TIMESTAMP NOT NULL DEFAULT current_timestamp)""",
        """CREATE TABLE job_units (
            job_id BIGINT NOT NULL,
            unit VARCHAR NOT NULL,
            status VARCHAR NOT NULL DEFAULT 'queued',
            done BIGINT NOT NULL DEFAULT 0,
            total BIGINT NOT NULL DEFAULT 0,
            message VARCHAR NOT NULL DEFAULT '',
            updated_at TIMESTAMP NOT NULL DEFAULT current_timestamp,
            PRIMARY KEY (job_id, unit))""",
        """INSERT INTO meta VALUES ('schema_version', 1), ('generation', 0)""",
    ],
    [
        # Whether an iterative estimate (an eigenvalue) converged; NULL for direct estimates.
        "ALTER TABLE results ADD COLUMN converged BOOLEAN",
        # The direction a result declares (lm-eval result files carry it per metric); NULL when not declared.
        "ALTER TABLE results ADD COLUMN higher_is_better BOOLEAN",
    ],
]
SCHEMA_VERSION = len(MIGRATIONS)


def schema_version(con: duckdb.DuckDBPyConnection) -> int:
    """The schema version recorded in an open cache; 0 for a file with no schema yet."""
    exists = con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = 'meta'").fetchone()
    if not exists or exists[0] == 0:
        return 0
    row = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    return int(row[0]) if row else 0


def migrate_schema(con: duckdb.DuckDBPyConnection, path: Path) -> None:
    """Bring the open cache at ``path`` up to SCHEMA_VERSION in one transaction; refuse a newer one."""
    version = schema_version(con)
    if version > SCHEMA_VERSION:
        raise ValueError(f"{path}: written by a newer version of this tool (schema {version}); upgrade the tool")
    if version == SCHEMA_VERSION:
        return
    con.execute("BEGIN TRANSACTION")
    try:
        for statements in MIGRATIONS[version:]:
            for sql in statements:
                con.execute(sql)
        con.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", [SCHEMA_VERSION])
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise
