"""Computed results and their per-sample records: the row types, writing a unit's rows, and reading them.

A result is keyed by (run, step, metric, params_hash) and stored beside the fingerprint of the
weights it describes, its parameters and the code and library versions that produced it, so a cached
value is reused only when all of them match. A unit's rows are written in one transaction, with the
unit's progress when given, so a unit is never marked done without its results.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import duckdb
import pandas as pd

from analysis.runs.base import Checkpoint, Run
from analysis.store.connection import StoreConnection
from analysis.store.jobs import UnitUpdate, update_unit

RESULT_COLUMNS = ["run", "step", "tokens", "metric", "value", "stderr"]
LONG_COLUMNS = [*RESULT_COLUMNS, "params_hash", "params", "converged", "higher_is_better"]


def params_hash(params: dict) -> str:
    """Hash of the canonical JSON of a request's parameters (sorted keys, no spaces)."""
    canonical = json.dumps(params, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ResultRow:
    """One cached value: a metric of one checkpoint under one set of parameters."""

    run: str
    step: int
    metric: str
    value: float | None
    fingerprint: str
    stderr: float | None = None
    n: int | None = None
    params: dict = field(default_factory=dict)
    code_version: str = ""
    lib_versions: dict = field(default_factory=dict)
    converged: bool | None = None  # iterative estimates only: False is stored and shown as unconverged
    higher_is_better: bool | None = None  # the direction the producer declared, when it declared one

    @property
    def params_hash(self) -> str:
        return params_hash(self.params)


@dataclass(frozen=True)
class SampleRow:
    """One per-sample record behind a result (for drill-down)."""

    run: str
    step: int
    metric: str
    params_hash: str
    sample_id: str
    value: float | None
    record: dict = field(default_factory=dict)


def _finite_or_none(x: float | None) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape a result, stored beside each value."""
    import importlib.metadata as md

    out = {}
    for name in ("torch", "transformers", "lm-eval", "duckdb"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "absent"
    return out


def _add_imported_checkpoints(
    con: duckdb.DuckDBPyConnection, runs: Sequence[Run], checkpoints: Sequence[tuple[str, Checkpoint]]
) -> None:
    """Create the runs and (run, checkpoint) pairs that do not exist yet; leave existing ones as they are."""
    for run in runs:
        con.execute(
            "INSERT INTO runs (name, source, config) VALUES (?, ?, ?) ON CONFLICT (name) DO NOTHING",
            [run.name, run.source, json.dumps(run.config, default=str)],
        )
    for run_name, ckpt in checkpoints:
        con.execute(
            """INSERT INTO checkpoints (run, step, tokens, path, fingerprint) VALUES (?, ?, ?, ?, ?)
               ON CONFLICT (run, step) DO NOTHING""",
            [run_name, ckpt.step, ckpt.tokens, ckpt.path, ckpt.fingerprint],
        )


def _refuse_unregistered_weights(con: duckdb.DuckDBPyConnection, rows: Sequence[ResultRow]) -> None:
    """Refuse a row whose checkpoint is not registered, or was registered with other weights since."""
    current = {
        (run, step): fp
        for run, step, fp in con.execute(
            "SELECT run, step, fingerprint FROM checkpoints WHERE run IN (SELECT unnest(?))",
            [sorted({r.run for r in rows})],
        ).fetchall()
    }
    for row in rows:
        fp = current.get((row.run, row.step))
        if fp is None:
            raise ValueError(f"run {row.run!r} has no checkpoint at step {row.step}; register it with add-run")
        if fp != row.fingerprint:
            raise ValueError(
                f"run {row.run!r} step {row.step}: the checkpoint changed since it was evaluated; "
                "re-run add-run and evaluate again"
            )


def _insert_results(con: duckdb.DuckDBPyConnection, rows: Sequence[ResultRow]) -> None:
    """Insert or replace result rows in one statement (row-by-row INSERTs cost ~6 ms each: bench/store_write.py)."""
    frame = pd.DataFrame(
        {
            "run": [r.run for r in rows],
            "step": [r.step for r in rows],
            "metric": [r.metric for r in rows],
            "params_hash": [r.params_hash for r in rows],
            "fingerprint": [r.fingerprint for r in rows],
            "value": pd.array([_finite_or_none(r.value) for r in rows], dtype="Float64"),
            "stderr": pd.array([_finite_or_none(r.stderr) for r in rows], dtype="Float64"),
            "n": pd.array([r.n for r in rows], dtype="Int64"),
            "params": [json.dumps(r.params, sort_keys=True, default=str) for r in rows],
            "code_version": [r.code_version for r in rows],
            "lib_versions": [json.dumps(r.lib_versions, sort_keys=True) for r in rows],
            "converged": pd.array([r.converged for r in rows], dtype="boolean"),
            "higher_is_better": pd.array([r.higher_is_better for r in rows], dtype="boolean"),
        }
    )
    # A key given twice in one unit: the later row wins, as it would written one at a time.
    frame = frame.drop_duplicates(["run", "step", "metric", "params_hash"], keep="last")
    con.register("incoming_results", frame)
    con.execute(
        """INSERT OR REPLACE INTO results (run, step, metric, params_hash, fingerprint, value, stderr, n,
           params, code_version, lib_versions, converged, higher_is_better, created_at)
           SELECT run, step, metric, params_hash, fingerprint, value, stderr, n,
                  params, code_version, lib_versions, converged, higher_is_better, now()
           FROM incoming_results"""
    )
    con.unregister("incoming_results")


def _insert_samples(con: duckdb.DuckDBPyConnection, samples: Sequence[SampleRow]) -> None:
    """Insert or replace per-sample records in one statement."""
    frame = pd.DataFrame(
        {
            "run": [s.run for s in samples],
            "step": [s.step for s in samples],
            "metric": [s.metric for s in samples],
            "params_hash": [s.params_hash for s in samples],
            "sample_id": [s.sample_id for s in samples],
            "value": [_finite_or_none(s.value) for s in samples],
            "record": [json.dumps(s.record, default=str) for s in samples],
        }
    )
    con.register("incoming_samples", frame)
    con.execute("INSERT OR REPLACE INTO sample_results SELECT * FROM incoming_samples")
    con.unregister("incoming_samples")


class ResultsMixin(StoreConnection):
    """The results' part of Store: writing a unit's results and samples, and every read of them."""

    def write_results(
        self,
        rows: Sequence[ResultRow],
        samples: Sequence[SampleRow] = (),
        *,
        unit: UnitUpdate | None = None,
        new_checkpoints: Sequence[tuple[str, Checkpoint]] = (),
        new_runs: Sequence[Run] = (),
    ) -> int:
        """Write a unit's results (typically one checkpoint's) atomically; returns rows written.

        ``unit``, when given, records the job unit's new status in the same transaction,
        so a unit is never marked done without its results, nor the reverse. A row for a
        checkpoint the store does not know, or whose fingerprint no longer matches, is
        refused: it would describe weights that are not registered. ``new_checkpoints``
        (run, checkpoint) pairs are registered first, in the same transaction, where the
        run has none at that step yet: imported results of checkpoints with no local folder.
        ``new_runs`` are created first (name, source, config; left as they are when they exist), so
        an import that creates its run and fails leaves no empty run behind.
        """
        if not rows and not samples and unit is None and not new_checkpoints and not new_runs:
            return 0
        with self._write() as con:
            if unit is not None:
                update_unit(con, unit)
            _add_imported_checkpoints(con, new_runs, new_checkpoints)
            _refuse_unregistered_weights(con, rows)
            if rows:
                _insert_results(con, rows)
            if samples:
                _insert_samples(con, samples)
        return len(rows) + len(samples)

    def cached(self, run: str, step: int, metric: str, params: dict, fingerprint: str) -> ResultRow | None:
        """The cached result for exactly this request, or None if it must be computed."""
        frame = self._read(
            """SELECT value, stderr, n, params, code_version, lib_versions, converged, higher_is_better FROM results
               WHERE run = ? AND step = ? AND metric = ? AND params_hash = ? AND fingerprint = ?""",
            [run, step, metric, params_hash(params), fingerprint],
        )
        if not len(frame):
            return None
        rec = frame.iloc[0]
        return ResultRow(
            run=run,
            step=step,
            metric=metric,
            value=None if pd.isna(rec["value"]) else float(rec["value"]),
            fingerprint=fingerprint,
            stderr=None if pd.isna(rec["stderr"]) else float(rec["stderr"]),
            n=None if pd.isna(rec["n"]) else int(rec["n"]),
            params=json.loads(rec["params"]),
            code_version=rec["code_version"],
            lib_versions=json.loads(rec["lib_versions"]),
            converged=None if pd.isna(rec["converged"]) else bool(rec["converged"]),
            higher_is_better=None if pd.isna(rec["higher_is_better"]) else bool(rec["higher_is_better"]),
        )

    def results(self, runs: list[str] | str, metrics: list[str] | None = None) -> pd.DataFrame:
        """Cached results in long form, joined with checkpoint tokens."""
        runs = [runs] if isinstance(runs, str) else list(runs)
        sql = """SELECT x.run, x.step, c.tokens, x.metric, x.value, x.stderr, x.n, x.params, x.params_hash,
                        x.code_version, x.lib_versions, x.converged, x.higher_is_better, x.created_at
                 FROM results x LEFT JOIN checkpoints c ON c.run = x.run AND c.step = x.step
                 WHERE x.run IN (SELECT unnest(?))"""
        params: list = [runs]
        if metrics:
            sql += " AND x.metric IN (SELECT unnest(?))"
            params.append(list(metrics))
        return self._read(sql + " ORDER BY x.run, x.metric, x.step", params)

    def sample_results(self, run: str, metric: str) -> pd.DataFrame:
        """Per-sample records of one metric across a run's checkpoints."""
        return self._read(
            """SELECT step, params_hash, sample_id, value, record FROM sample_results
               WHERE run = ? AND metric = ? ORDER BY step, sample_id""",
            [run, metric],
        )

    def sample_metrics(self, run: str) -> list[str]:
        """The metrics of a run that have per-sample records, sorted."""
        frame = self._read("SELECT DISTINCT metric FROM sample_results WHERE run = ? ORDER BY metric", [run])
        return list(frame["metric"]) if len(frame) else []

    def long_table(self, runs: list[str] | str) -> pd.DataFrame:
        """Everything known about runs as one long table: run, step, tokens, metric, value, stderr.

        Logged series (stderr empty) and computed results together, the shape the ``query`` command
        prints, plus what tells series apart and how far to trust a value: ``params_hash`` and
        ``params`` (the setting a result was computed under; '' and '{}' for logged series),
        ``converged`` (False for an iterative estimate that did not converge, else NULL/True),
        ``higher_is_better`` (the direction the producer declared, NULL if none) and ``source``.

        The stderr of a share of items right (``acc``, ``exact_match``) never reads 0 at a score of 0 or 1
        (:func:`analysis.significance.binary_mean_stderr`); the cache keeps lm-eval's own.
        """
        from analysis.significance import binary_mean_stderr, is_binary_mean

        runs = [runs] if isinstance(runs, str) else list(runs)
        frame = self._read(
            """SELECT run, step, tokens, metric, value, NULL::DOUBLE AS stderr, '' AS params_hash,
                      '{}' AS params, NULL::BOOLEAN AS converged, NULL::BOOLEAN AS higher_is_better,
                      'log' AS source, NULL::BIGINT AS n
               FROM log_series WHERE run IN (SELECT unnest($1))
               UNION ALL
               SELECT x.run, x.step, c.tokens, x.metric, x.value, x.stderr, x.params_hash, x.params,
                      x.converged, x.higher_is_better, 'result' AS source, x.n
               FROM results x LEFT JOIN checkpoints c ON c.run = x.run AND c.step = x.step
               WHERE x.run IN (SELECT unnest($1))
               ORDER BY run, metric, params_hash, step""",
            [runs],
        )
        if not len(frame):
            return pd.DataFrame(columns=[*LONG_COLUMNS, "source"])
        shares = frame["metric"].map(is_binary_mean).to_numpy(dtype=bool) & frame["stderr"].notna().to_numpy()
        if shares.any():
            rows = frame.loc[shares]
            frame.loc[shares, "stderr"] = binary_mean_stderr(rows["value"], rows["n"], rows["stderr"])
        return frame.drop(columns="n")

    def cached_keys(self, run: str, step: int, fingerprint: str) -> set[tuple[str, str]]:
        """Every (metric, params_hash) cached for one checkpoint's current weights."""
        frame = self._read(
            "SELECT metric, params_hash FROM results WHERE run = ? AND step = ? AND fingerprint = ?",
            [run, step, fingerprint],
        )
        return set(zip(frame.get("metric", []), frame.get("params_hash", []), strict=True))
