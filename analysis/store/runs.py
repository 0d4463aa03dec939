"""Runs, their checkpoints and their training logs: registering, relocating, deleting and listing them.

A checkpoint is keyed by (run, step) and carries the fingerprint of its weights; registering a
changed fingerprint drops the results cached for the old weights.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import duckdb
import pandas as pd

from analysis.runs.base import NO_WEIGHTS_PREFIX, Run
from analysis.store.connection import StoreConnection, fetch_row


@dataclass(frozen=True)
class RegisterReport:
    """What register_run changed."""

    run: str
    checkpoints: int
    new_checkpoints: int
    changed_checkpoints: int  # fingerprint differed: their cached results were dropped
    log_rows: int


def _upsert_checkpoints(con: duckdb.DuckDBPyConnection, run: Run) -> tuple[int, int]:
    """Insert or update ``run``'s checkpoints; returns how many were new and how many changed weights."""
    known = dict(con.execute("SELECT step, fingerprint FROM checkpoints WHERE run = ?", [run.name]).fetchall())
    new = changed = 0
    for ckpt in run.checkpoints:
        old = known.get(ckpt.step)
        if old is not None and ckpt.fingerprint.startswith(NO_WEIGHTS_PREFIX):
            continue
        if old is None:
            new += 1
        elif old != ckpt.fingerprint:
            changed += 1
            for table in ("results", "sample_results"):
                con.execute(f"DELETE FROM {table} WHERE run = ? AND step = ?", [run.name, ckpt.step])
        con.execute(
            """INSERT OR REPLACE INTO checkpoints (run, step, tokens, path, fingerprint, revision)
               VALUES (?, ?, ?, ?, ?, ?)""",
            [run.name, ckpt.step, ckpt.tokens, ckpt.path, ckpt.fingerprint, ckpt.revision],
        )
    return new, changed


def _replace_log(con: duckdb.DuckDBPyConnection, run: Run) -> int:
    """Replace ``run``'s logged series by ``run.log`` (finite values, a repeated step's last); returns rows written."""
    con.execute("DELETE FROM log_series WHERE run = ?", [run.name])
    log = run.log
    if not len(log):
        return 0
    frame = pd.DataFrame(
        {
            "run": run.name,
            "step": log["step"].astype("int64"),
            "tokens": log["tokens"].astype("Int64") if "tokens" in log else pd.NA,
            "metric": log["metric"].astype(str),
            "value": log["value"].astype("float64"),
        }
    )
    frame = frame[frame["value"].map(math.isfinite)]
    frame = frame.drop_duplicates(["step", "metric"], keep="last")
    con.register("incoming_log", frame)
    con.execute("INSERT INTO log_series SELECT run, step, tokens, metric, value FROM incoming_log")
    con.unregister("incoming_log")
    return len(frame)


class RunsMixin(StoreConnection):
    """The runs' part of Store: runs, checkpoints and logged series."""

    def register_run(self, run: Run, *, trust_remote_code: bool = False) -> RegisterReport:
        """Insert or update a run, its checkpoints and its training log, in one transaction.

        A checkpoint whose fingerprint changed loses its cached results (they described
        other weights). A checkpoint without weights here (``no-weights:`` fingerprint) never
        replaces one already registered at its step: it has nothing to compare, and the results
        already cached there (imported ones, say) stay. The run's log series are replaced by ``run.log``.
        """
        with self._write() as con:
            con.execute(
                """INSERT INTO runs (name, source, config, trust_remote_code) VALUES (?, ?, ?, ?)
                   ON CONFLICT (name) DO UPDATE SET source = excluded.source, config = excluded.config,
                   trust_remote_code = excluded.trust_remote_code, updated_at = now()""",
                [run.name, run.source, json.dumps(run.config, default=str), trust_remote_code],
            )
            new, changed = _upsert_checkpoints(con, run)
            n_log = _replace_log(con, run)
        return RegisterReport(run.name, len(run.checkpoints), new, changed, n_log)

    def delete_run(self, name: str) -> None:
        """Remove a run and everything cached for it."""
        with self._write() as con:
            for table in ("results", "sample_results", "log_series", "checkpoints"):
                con.execute(f"DELETE FROM {table} WHERE run = ?", [name])
            con.execute("DELETE FROM runs WHERE name = ?", [name])

    def relocate_runs(self, names: list[str], old_root: str, new_root: str) -> int:
        """Point ``names``' source and checkpoint paths under ``old_root`` at ``new_root`` instead.

        For results computed elsewhere (the shipped demo): the values stay, the paths follow the local
        folders. Only a leading ``old_root`` is replaced. Returns the number of checkpoint rows changed.
        """
        changed = 0
        with self._write() as con:
            for name in names:
                con.execute(
                    "UPDATE runs SET source = ? || substr(source, length(?) + 1)"
                    " WHERE name = ? AND starts_with(source, ?)",
                    [new_root, old_root, name, old_root],
                )
                (n,) = fetch_row(
                    con, "SELECT count(*) FROM checkpoints WHERE run = ? AND starts_with(path, ?)", [name, old_root]
                )
                con.execute(
                    "UPDATE checkpoints SET path = ? || substr(path, length(?) + 1)"
                    " WHERE run = ? AND starts_with(path, ?)",
                    [new_root, old_root, name, old_root],
                )
                changed += n
        return changed

    def runs(self) -> pd.DataFrame:
        """One row per run: name, source, checkpoint count, first and last step, results count."""
        return self._read(
            """SELECT r.name, r.source, r.config, r.trust_remote_code,
                      (SELECT count(*) FROM checkpoints c WHERE c.run = r.name) AS checkpoints,
                      (SELECT min(step) FROM checkpoints c WHERE c.run = r.name) AS first_step,
                      (SELECT max(step) FROM checkpoints c WHERE c.run = r.name) AS last_step,
                      (SELECT count(*) FROM results x WHERE x.run = r.name) AS results,
                      (SELECT count(DISTINCT metric) FROM log_series l WHERE l.run = r.name) AS log_metrics,
                      r.updated_at
               FROM runs r ORDER BY r.name"""
        )

    def checkpoints(self, run: str) -> pd.DataFrame:
        """A run's checkpoints ordered by step."""
        return self._read(
            "SELECT step, tokens, path, fingerprint, revision FROM checkpoints WHERE run = ? ORDER BY step",
            [run],
        )

    def log_series(self, runs: list[str] | str, metrics: list[str] | None = None) -> pd.DataFrame:
        """Training-log curves in long form: run, step, tokens, metric, value."""
        runs = [runs] if isinstance(runs, str) else list(runs)
        if not runs:
            return pd.DataFrame(columns=["run", "step", "tokens", "metric", "value"])
        sql = "SELECT run, step, tokens, metric, value FROM log_series WHERE run IN (SELECT unnest(?))"
        params: list = [runs]
        if metrics:
            sql += " AND metric IN (SELECT unnest(?))"
            params.append(list(metrics))
        return self._read(sql + " ORDER BY run, metric, step", params)
