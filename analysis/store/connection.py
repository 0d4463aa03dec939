"""Opening the cache file: taking turns between threads, retrying while another process holds its lock.

DuckDB 2.0 lets no second process open a database file, not even read-only, while one process
holds it open, and refuses a read-only and a read-write connection to one file open at once in one
process. So every access opens the file, does its work in one transaction and closes it; threads of
a process take turns on a file, and an open retries with jittered backoff for a bounded time.
StoreConnection is the base of Store: every other part of the store reads and writes through it.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd

from analysis.store.schema import SCHEMA_VERSION, migrate_schema, schema_version

DEFAULT_DB = Path("data/cache.duckdb")


class StoreLockedError(RuntimeError):
    """Another process held the database file for longer than the retry budget."""


_TURNS: dict[str, threading.RLock] = {}
_TURNS_GUARD = threading.Lock()


def _file_turn(path: Path) -> threading.RLock:
    """The lock this process's threads take turns on for one cache file (re-entrant: a thread may nest reads)."""
    key = os.path.realpath(path)
    with _TURNS_GUARD:
        return _TURNS.setdefault(key, threading.RLock())


def fetch_row(con: duckdb.DuckDBPyConnection, sql: str, params: Iterable = ()) -> tuple[Any, ...]:
    """The one row a query always returns (a count, an aggregate, a max); none would be a bug, not bad input."""
    row = con.execute(sql, list(params)).fetchone()
    if row is None:
        raise RuntimeError(f"no row from a query that always returns one: {' '.join(sql.split())}")
    return row


def _is_lock_error(err: Exception) -> bool:
    text = str(err).lower()
    return "lock" in text and ("conflict" in text or "could not set lock" in text)


class StoreConnection:
    """A handle on one cache file that opens it per call: connections, transactions and checked reads."""

    def __init__(self, path: str | Path = DEFAULT_DB, *, lock_timeout: float = 30.0) -> None:
        self.path = Path(path)
        self.lock_timeout = lock_timeout

    # -- connections ---------------------------------------------------------------

    @contextmanager
    def _connect(self, *, read_only: bool) -> Iterator[duckdb.DuckDBPyConnection]:
        """Open the file, retrying with jittered backoff while another process holds it.

        Threads of one process (the dashboard's sessions) take turns on a file: DuckDB refuses a
        read-only and a read-write connection to the same file open at once in one process.
        """
        if not read_only:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise ValueError(f"{self.path}: cannot create its folder ({err.strerror}); pass another --db") from None
        deadline = time.monotonic() + self.lock_timeout
        turn = _file_turn(self.path)
        if not turn.acquire(timeout=self.lock_timeout):
            raise StoreLockedError(
                f"{self.path}: still in use by another thread of this process after {self.lock_timeout:.0f} s; "
                "try again when it has finished"
            )
        try:
            with self._open(read_only, deadline) as con:
                yield con
        finally:
            turn.release()

    @contextmanager
    def _open(self, read_only: bool, deadline: float) -> Iterator[duckdb.DuckDBPyConnection]:
        """Connect, retrying until ``deadline`` while another process holds the file's lock."""
        delay = 0.005
        while True:
            try:
                con = duckdb.connect(str(self.path), read_only=read_only)
                break
            except duckdb.Error as err:
                if not _is_lock_error(err):
                    if "permission denied" in str(err).lower():
                        raise ValueError(
                            f"{self.path}: cannot open the cache for writing (permission denied); "
                            "make the file and its folder writable, or pass another --db"
                        ) from None
                    raise ValueError(
                        f"{self.path}: cannot open the cache ({str(err).splitlines()[0]}); "
                        "move the file aside to start a fresh cache"
                    ) from None
                if time.monotonic() > deadline:
                    raise StoreLockedError(
                        f"{self.path}: still locked by another process after {self.lock_timeout:.0f} s; "
                        "stop the other process or use another --db"
                    ) from None
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 0.05)  # short: a busy writer leaves only brief gaps
        try:
            yield con
        finally:
            con.close()

    @contextmanager
    def _write(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """One write transaction on a migrated database; bumps the generation counter."""
        with self._connect(read_only=False) as con:
            try:
                migrate_schema(con, self.path)
                con.execute("BEGIN TRANSACTION")
                try:
                    yield con
                    con.execute("UPDATE meta SET value = value + 1 WHERE key = 'generation'")
                    con.execute("COMMIT")
                except BaseException:
                    with suppress(duckdb.Error):  # after a failed COMMIT there is nothing left to roll back
                        con.execute("ROLLBACK")
                    raise
            except (duckdb.IOException, duckdb.TransactionException, duckdb.FatalException) as err:
                # Disk full, a file size limit, a folder that refuses the .wal file. The transaction is
                # atomic: the file keeps its last committed state (tests/test_faults.py).
                if isinstance(err, duckdb.TransactionException) and "commit" not in str(err).lower():
                    raise
                reason = str(err).splitlines()[0]
                raise ValueError(
                    f"{self.path}: cannot write the cache ({reason}); "
                    "free disk space or make the file and its folder writable, then run the command again"
                ) from None

    @contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """One raw write transaction, for benchmarks' baselines (bench/store_write.py); code adds a Store method."""
        with self._write() as con:
            yield con

    @contextmanager
    def _snapshot(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A read-only connection on an up-to-date cache (the exchange's export)."""
        if not self.path.exists():
            raise ValueError(f"{self.path}: no cache file; pass the right --db")
        with self._connect(read_only=True) as con:
            version = schema_version(con)
            if version != SCHEMA_VERSION:
                raise ValueError(
                    f"{self.path}: schema {version}, this tool uses {SCHEMA_VERSION}; run `python -m analysis migrate`"
                )
            yield con

    def _read(self, sql: str, params: Iterable = ()) -> pd.DataFrame:
        """Run one query read-only; an absent cache file reads as empty."""
        if not self.path.exists():
            return pd.DataFrame()
        with self._connect(read_only=True) as con:
            version = schema_version(con)
            if version == 0:
                return pd.DataFrame()
            if version > SCHEMA_VERSION:
                raise ValueError(
                    f"{self.path}: written by a newer version of this tool (schema {version}); upgrade the tool"
                )
            if version < SCHEMA_VERSION:
                raise ValueError(
                    f"{self.path}: schema {version} is older than {SCHEMA_VERSION}; run `python -m analysis migrate`"
                )
            return con.execute(sql, list(params)).df()

    def migrate(self) -> int:
        """Create or upgrade the schema; returns the schema version now in the file."""
        with self._connect(read_only=False) as con:
            migrate_schema(con, self.path)
            return schema_version(con)

    def generation(self) -> int:
        """A counter every write bumps: readers cache on it. -1 when there is no cache yet."""
        frame = self._read("SELECT value FROM meta WHERE key = 'generation'")
        return int(frame["value"].iloc[0]) if len(frame) else -1
