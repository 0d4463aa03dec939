"""The DuckDB cache: schema, invalidation, atomic writes, and two processes at once."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest

from analysis.runs.base import Checkpoint
from analysis.store import SCHEMA_VERSION, ResultRow, SampleRow, Store, StoreLockedError, params_hash
from tests.conftest import ROOT, synthetic_run


def test_fresh_file_is_migrated_and_empty_reads_do_not_create_it(db: Path) -> None:
    store = Store(db)
    assert store.runs().empty
    assert not db.exists()  # a read never creates the file
    assert store.migrate() == SCHEMA_VERSION
    assert store.generation() == 0


def test_register_run_round_trips_checkpoints_and_log(db: Path) -> None:
    store = Store(db)
    run = synthetic_run("alpha")
    report = store.register_run(run)
    assert (report.checkpoints, report.new_checkpoints, report.changed_checkpoints) == (5, 5, 0)
    ckpts = store.checkpoints("alpha")
    assert list(ckpts["step"]) == [1, 10, 30, 60, 120]
    log = store.log_series("alpha")
    assert len(log) == 120
    assert log["value"].tolist() == pytest.approx(run.log["value"].tolist())
    runs = store.runs()
    assert runs.loc[0, "name"] == "alpha" and runs.loc[0, "checkpoints"] == 5


def test_nan_log_values_are_dropped_and_duplicate_steps_keep_the_last(db: Path) -> None:
    run = synthetic_run("alpha", n_steps=4)
    run.log.loc[1, "value"] = float("nan")
    run.log.loc[2, "value"] = float("inf")
    dup = run.log.iloc[[3]].copy()
    dup["value"] = 42.0
    run.log = __import__("pandas").concat([run.log, dup], ignore_index=True)
    Store(db).register_run(run)
    log = Store(db).log_series("alpha")
    assert log["step"].tolist() == [1, 4]
    assert log["value"].iloc[-1] == 42.0


def test_changed_fingerprint_drops_that_checkpoints_results_only(db: Path) -> None:
    store = Store(db)
    run = synthetic_run("alpha")
    store.register_run(run)
    store.write_results(
        [
            ResultRow("alpha", 10, "heldout_loss", 2.5, "fp-alpha-10", stderr=0.1, n=64),
            ResultRow("alpha", 30, "heldout_loss", 2.2, "fp-alpha-30", stderr=0.1, n=64),
        ]
    )
    run.checkpoints[1] = Checkpoint(10, "/runs/alpha/step_10", 5120, "fp-new")
    report = store.register_run(run)
    assert report.changed_checkpoints == 1
    left = store.results("alpha")
    assert left["step"].tolist() == [30]
    assert store.cached("alpha", 10, "heldout_loss", {}, "fp-alpha-10") is None
    assert store.cached("alpha", 30, "heldout_loss", {}, "fp-alpha-30").value == 2.2


def test_cache_hit_needs_the_same_params_and_fingerprint(populated_db: Path) -> None:
    store = Store(populated_db)
    params = {"n_probes": 8, "seed": 0}
    store.write_results([ResultRow("alpha", 10, "hessian_trace", 12.0, "fp-alpha-10", 0.5, 8, params)])
    hit = store.cached("alpha", 10, "hessian_trace", {"seed": 0, "n_probes": 8}, "fp-alpha-10")
    assert hit is not None and hit.value == 12.0 and hit.stderr == 0.5
    assert store.cached("alpha", 10, "hessian_trace", {"n_probes": 9, "seed": 0}, "fp-alpha-10") is None
    assert store.cached("alpha", 10, "hessian_trace", params, "other") is None
    assert params_hash({"a": 1, "b": 2}) == params_hash({"b": 2, "a": 1})


def test_a_failing_write_leaves_nothing_half_written(populated_db: Path) -> None:
    store = Store(populated_db)
    before = store.generation()
    good = ResultRow("alpha", 10, "m", 1.0, "fp-alpha-10")
    bad = ResultRow("alpha", 999, "m", 1.0, "fp")  # no such checkpoint
    with pytest.raises(ValueError, match="no checkpoint at step 999"):
        store.write_results([good, bad])
    assert store.results("alpha").empty
    assert store.generation() == before


def test_results_for_a_changed_checkpoint_are_refused(populated_db: Path) -> None:
    with pytest.raises(ValueError, match="changed since it was evaluated"):
        Store(populated_db).write_results([ResultRow("alpha", 10, "m", 1.0, "stale")])


def test_nan_results_are_stored_as_missing_and_samples_round_trip(populated_db: Path) -> None:
    store = Store(populated_db)
    row = ResultRow("beta", 30, "task/acc,none", float("nan"), "fp-beta-30", stderr=float("inf"))
    sample = SampleRow("beta", 30, "task/acc,none", row.params_hash, "7", 1.0, {"target": "52"})
    assert store.write_results([row], [sample]) == 2
    got = store.results("beta")
    assert got["value"].isna().all() and got["stderr"].isna().all()
    samples = store.sample_results("beta", "task/acc,none")
    assert samples["sample_id"].tolist() == ["7"] and '"52"' in samples["record"].iloc[0]


def test_a_unit_written_in_bulk_keeps_every_field_and_the_last_of_a_repeated_key(populated_db: Path) -> None:
    store = Store(populated_db)
    rows = [
        ResultRow("alpha", 10, "task/acc", 0.25, "fp-alpha-10", stderr=0.01, n=40, params={"shots": 0}),
        ResultRow("alpha", 10, "task/acc", 0.50, "fp-alpha-10", stderr=None, n=None, params={"shots": 5}),
        ResultRow("alpha", 30, "task/acc", 0.10, "fp-alpha-30", code_version="abc", lib_versions={"torch": "x"}),
        ResultRow("alpha", 30, "task/acc", 0.75, "fp-alpha-30", code_version="abc", lib_versions={"torch": "x"}),
    ]
    assert store.write_results(rows) == 4
    got = store.results("alpha", ["task/acc"]).sort_values(["step", "params"]).reset_index(drop=True)
    assert got["step"].tolist() == [10, 10, 30]
    assert got["value"].tolist() == [0.25, 0.50, 0.75]  # step 30 was given twice: the later value is kept
    assert got.loc[0, "stderr"] == 0.01 and got.loc[0, "n"] == 40
    assert pd.isna(got.loc[1, "stderr"]) and pd.isna(got.loc[1, "n"])
    assert json.loads(got.loc[1, "params"]) == {"shots": 5} and got.loc[2, "code_version"] == "abc"
    assert json.loads(got.loc[2, "lib_versions"]) == {"torch": "x"}
    # A later unit replaces a key in place rather than adding a second row.
    store.write_results([ResultRow("alpha", 10, "task/acc", 0.9, "fp-alpha-10", params={"shots": 0})])
    again = store.results("alpha", ["task/acc"])
    assert len(again) == 3 and 0.9 in again["value"].tolist() and 0.25 not in again["value"].tolist()


def test_long_table_has_logs_and_results_with_tokens(populated_db: Path) -> None:
    store = Store(populated_db)
    store.write_results([ResultRow("alpha", 60, "heldout_loss", 2.0, "fp-alpha-60", 0.05, 10)])
    table = store.long_table(["alpha"])
    assert set(table.columns) >= {"run", "step", "tokens", "metric", "value", "stderr"}
    row = table[table["metric"] == "heldout_loss"].iloc[0]
    assert (row["step"], row["tokens"], row["value"], row["stderr"]) == (60, 60 * 512, 2.0, 0.05)
    assert (table["metric"] == "train/loss").sum() == 120


def test_long_table_reads_a_perfect_or_zero_share_right_with_a_stderr_above_zero(populated_db: Path) -> None:
    store = Store(populated_db)
    store.write_results(
        [
            ResultRow("alpha", 60, "t/acc,none", 1.0, "fp-alpha-60", 0.0, 100),  # lm-eval's stderr at 100/100
            ResultRow("alpha", 60, "t/exact_match,none", 0.5, "fp-alpha-60", 0.0503, 100),
            ResultRow("alpha", 60, "finetune/m/change:t/acc,none", 0.0, "fp-alpha-60", 0.0, 200),
            ResultRow("alpha", 60, "u/acc,none", 1.0, "fp-alpha-60", 0.0),  # no n: nothing to go on
        ]
    )
    table = store.long_table(["alpha"]).set_index("metric")
    assert table.loc["t/acc,none", "stderr"] == pytest.approx(math.sqrt((102 / 104) * (2 / 104) / 104))
    assert table.loc["t/exact_match,none", "stderr"] == 0.0503  # lm-eval's own away from the ends
    assert table.loc["finetune/m/change:t/acc,none", "stderr"] == 0.0  # a change, not a share
    assert table.loc["u/acc,none", "stderr"] == 0.0
    assert store.results("alpha").set_index("metric").loc["t/acc,none", "stderr"] == 0.0  # the cache keeps it
    assert "n" not in table.columns


def test_long_table_keeps_settings_convergence_and_declared_direction_apart(populated_db: Path) -> None:
    store = Store(populated_db)
    store.write_results(
        [
            ResultRow("alpha", 60, "hessian_trace", 5.0, "fp-alpha-60", 0.1, params={"subset": "all"}),
            ResultRow("alpha", 60, "hessian_trace", 1.0, "fp-alpha-60", 0.1, params={"subset": "layer:0"}),
            ResultRow("alpha", 60, "hessian_top_eigenvalue", 0.3, "fp-alpha-60", converged=False),
            ResultRow("alpha", 60, "t/perplexity,none", 12.0, "fp-alpha-60", higher_is_better=False),
        ]
    )
    table = store.long_table(["alpha"]).set_index("metric")
    trace = table.loc["hessian_trace"]
    assert sorted(trace["value"]) == [1.0, 5.0] and trace["params_hash"].nunique() == 2
    assert {json.loads(p)["subset"] for p in trace["params"]} == {"all", "layer:0"}
    assert table.loc["hessian_top_eigenvalue", "converged"] == False  # noqa: E712 (numpy bool)
    assert not table.loc["t/perplexity,none", "higher_is_better"]
    assert pd.isna(table.loc["hessian_trace", "converged"]).all()
    logged = table.loc["train/loss"]
    assert (logged["params_hash"] == "").all() and logged["higher_is_better"].isna().all()
    cached = store.cached("alpha", 60, "hessian_top_eigenvalue", {}, "fp-alpha-60")
    assert cached is not None and cached.converged is False


def test_a_schema_1_file_is_upgraded_in_place_keeping_its_results(db: Path) -> None:
    import duckdb

    from analysis.store import MIGRATIONS

    con = duckdb.connect(str(db))
    for sql in MIGRATIONS[0]:
        con.execute(sql)
    con.execute("INSERT INTO runs (name, source) VALUES ('old', 'local')")
    con.execute("INSERT INTO checkpoints VALUES ('old', 5, 10, '/x', 'fp', NULL)")
    con.execute("INSERT INTO results (run, step, metric, params_hash, fingerprint, value) VALUES "
                "('old', 5, 'heldout_loss', 'h', 'fp', 2.5)")  # fmt: skip
    con.close()
    with pytest.raises(ValueError, match="analysis migrate"):  # a reader never writes: it says what to run
        Store(db).long_table("old")
    assert Store(db).migrate() == SCHEMA_VERSION
    table = Store(db).long_table("old")
    assert table["value"].tolist() == [2.5] and table["converged"].isna().all()


def test_delete_run_removes_everything(populated_db: Path) -> None:
    store = Store(populated_db)
    store.write_results([ResultRow("alpha", 60, "x", 2.0, "fp-alpha-60")])
    store.delete_run("alpha")
    assert store.runs()["name"].tolist() == ["beta"]
    assert store.long_table("alpha").empty


def test_corrupt_file_gives_one_line_error(tmp_path: Path) -> None:
    bad = tmp_path / "cache.duckdb"
    bad.write_bytes(b"this is not a database" * 100)
    with pytest.raises(ValueError) as info:
        Store(bad).runs()
    assert "cannot open the cache" in str(info.value) and "\n" not in str(info.value)


def test_newer_schema_is_refused(db: Path) -> None:
    import duckdb

    Store(db).migrate()
    con = duckdb.connect(str(db))
    con.execute("UPDATE meta SET value = 99 WHERE key = 'schema_version'")
    con.close()
    with pytest.raises(ValueError, match="newer version"):
        Store(db).runs()
    with pytest.raises(ValueError, match="newer version"):
        Store(db).register_run(synthetic_run("x"))


HOLDER = """
import duckdb, sys, time
con = duckdb.connect(sys.argv[1])
print("holding", flush=True)
time.sleep(float(sys.argv[2]))
con.close()
"""


@pytest.mark.slow
def test_lock_held_too_long_gives_a_clear_error_then_recovers(populated_db: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(populated_db), "2.5"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "holding"
        with pytest.raises(StoreLockedError, match="still locked by another process"):
            Store(populated_db, lock_timeout=0.3).runs()
        # A patient reader waits for the holder to let go.
        assert len(Store(populated_db, lock_timeout=20).runs()) == 2
    finally:
        holder.wait(timeout=30)


WRITER = """
import sys, time
sys.path.insert(0, sys.argv[2])
from analysis.store import ResultRow, Store
store = Store(sys.argv[1])
print("ready", flush=True)
deadline = time.monotonic() + float(sys.argv[3])
i = 0
while time.monotonic() < deadline:
    store.write_results([ResultRow("alpha", 10, "counter", float(i), "fp-alpha-10")])
    i += 1
    time.sleep(float(sys.argv[4]) if len(sys.argv) > 4 else 0.0)
print(i, flush=True)
"""


@pytest.mark.slow
def test_reader_and_writer_processes_never_see_a_lock_error(populated_db: Path) -> None:
    writer = subprocess.Popen(
        # A worker writes once per checkpoint unit, seconds apart; 20 writes a second is far busier.
        [sys.executable, "-c", WRITER, str(populated_db), str(ROOT), "4", "0.05"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert writer.stdout.readline().strip() == "ready"
    reads = 0
    seen = set()
    slowest = 0.0
    while writer.poll() is None:
        start = time.monotonic()
        frame = Store(populated_db).results("alpha", ["counter"])
        slowest = max(slowest, time.monotonic() - start)
        seen.update(frame["value"].tolist())
        reads += 1
        time.sleep(0.01)  # a dashboard rereads on interaction, not in a hot loop
    writes = int(writer.communicate(timeout=60)[0])
    assert writer.returncode == 0
    assert writes > 5 and reads > 5
    assert slowest < 3.0, f"a read waited {slowest:.2f} s for the writer"
    assert len(seen) >= 2  # the reader saw the writer's progress, not a frozen snapshot
    final = Store(populated_db).results("alpha", ["counter"])["value"].tolist()
    assert final == [float(writes - 1)]


@pytest.mark.slow
def test_threads_of_one_process_read_and_write_the_same_file_without_errors(populated_db: Path) -> None:
    # The dashboard's sessions are threads: DuckDB refuses a read-only and a read-write connection to one
    # file open at the same time in one process, so the store makes them take turns. A fixed amount of
    # work per thread, not a fixed time: on a loaded machine each open can take 100 ms.
    import threading

    errors: list[str] = []
    done = {"reads": 0, "writes": 0}

    def reader() -> None:
        for _ in range(15):
            try:
                Store(populated_db).results("alpha")
                done["reads"] += 1
            except Exception as err:  # any error fails the test below
                errors.append(str(err))

    def writer() -> None:
        for i in range(15):
            try:
                Store(populated_db).write_results([ResultRow("alpha", 10, "counter", float(i), "fp-alpha-10")])
                done["writes"] += 1
            except Exception as err:
                errors.append(str(err))

    threads = [threading.Thread(target=reader) for _ in range(3)] + [threading.Thread(target=writer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread waited its turn for over 2 minutes"
    assert errors == []
    assert done == {"reads": 45, "writes": 15}
    assert Store(populated_db).results("alpha", ["counter"])["value"].tolist() == [14.0]


@pytest.mark.slow
def test_kill_during_write_loses_only_the_uncommitted_transaction(populated_db: Path) -> None:
    code = textwrap.dedent(
        """
        import os, signal, sys
        sys.path.insert(0, sys.argv[2])
        from analysis.store import ResultRow, Store
        store = Store(sys.argv[1])
        store.write_results([ResultRow("alpha", 10, "kept", 1.0, "fp-alpha-10")])
        with store._write() as con:
            con.execute("INSERT INTO results (run, step, metric, params_hash, fingerprint, value) "
                        "VALUES ('alpha', 30, 'lost', 'h', 'fp-alpha-30', 2.0)")
            os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code, str(populated_db), str(ROOT)], timeout=60)
    assert proc.returncode == -9
    metrics = Store(populated_db).results("alpha")["metric"].tolist()
    assert metrics == ["kept"]
