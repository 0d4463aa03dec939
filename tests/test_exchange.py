"""Parquet export and import of the cache: round trip, idempotent merge, partial overlap, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pandas as pd
import pytest

from analysis.__main__ import main
from analysis.exchange import TABLES, export_parquet, import_parquet
from analysis.runs.base import Checkpoint, Run
from analysis.store import ResultRow, SampleRow, Store
from tests.conftest import synthetic_run


def _results(store: Store, run: str, steps: tuple[int, ...], metric: str = "heldout_loss") -> None:
    fps = dict(zip(store.checkpoints(run)["step"], store.checkpoints(run)["fingerprint"], strict=True))
    for step in steps:
        row = ResultRow(run, step, metric, 1.0 / step + 0.1, fps[step], 0.01, 12, {"seed": 0}, "v1", {"torch": "x"})
        samples = [SampleRow(run, step, metric, row.params_hash, f"s{i}", i / step, {"i": i}) for i in range(3)]
        store.write_results([row], samples)


def _tables(path: Path) -> dict[str, pd.DataFrame]:
    con = duckdb.connect(str(path), read_only=True)
    try:
        return {t: con.execute(f"SELECT * FROM {t} ORDER BY {', '.join(k)}").df() for t, k in TABLES.items()}
    finally:
        con.close()


def _assert_same(a: dict[str, pd.DataFrame], b: dict[str, pd.DataFrame]) -> None:
    for table in TABLES:
        pd.testing.assert_frame_equal(a[table], b[table], check_exact=True, obj=table)


@pytest.fixture
def source(tmp_path: Path) -> Store:
    store = Store(tmp_path / "cluster.duckdb")
    store.register_run(synthetic_run("alpha"))
    store.register_run(synthetic_run("beta", offset=0.4))
    _results(store, "alpha", (1, 10, 30))
    _results(store, "beta", (60, 120), metric="proxy")
    return store


def test_round_trip_into_a_fresh_cache_equals_the_original(source: Store, tmp_path: Path) -> None:
    manifest = export_parquet(source, tmp_path / "out")
    assert manifest["rows"]["results"] == 5 and manifest["rows"]["sample_results"] == 15
    fresh = Store(tmp_path / "laptop.duckdb")
    report = import_parquet(fresh, tmp_path / "out")
    assert report.added == sum(manifest["rows"].values()) and report.skipped == 0
    _assert_same(_tables(source.path), _tables(fresh.path))
    assert fresh.results(["alpha", "beta"])["value"].tolist() == source.results(["alpha", "beta"])["value"].tolist()


def test_importing_twice_adds_nothing(source: Store, tmp_path: Path) -> None:
    export_parquet(source, tmp_path / "out")
    fresh = Store(tmp_path / "laptop.duckdb")
    import_parquet(fresh, tmp_path / "out")
    before = _tables(fresh.path)
    again = import_parquet(fresh, tmp_path / "out")
    assert again.added == 0 and again.skipped == sum(len(f) for f in before.values())
    assert all(t.kept_local == 0 for t in again.tables)
    _assert_same(before, _tables(fresh.path))


def test_a_cache_holding_some_rows_gets_only_the_rest(source: Store, tmp_path: Path) -> None:
    export_parquet(source, tmp_path / "out", runs=["alpha"])
    laptop = Store(tmp_path / "laptop.duckdb")
    laptop.register_run(synthetic_run("alpha"))
    _results(laptop, "alpha", (1,))  # computed locally too, identical values
    report = {t.table: t for t in import_parquet(laptop, tmp_path / "out").tables}
    assert report["results"].added == 2 and report["results"].skipped == 1
    assert report["sample_results"].added == 6 and report["sample_results"].skipped == 3
    assert report["checkpoints"].added == 0 and report["log_series"].added == 0
    got, want = _tables(laptop.path), _tables(source.path)
    for table in ("results", "sample_results", "checkpoints", "log_series"):
        ours = got[table].drop(columns=["created_at"], errors="ignore").reset_index(drop=True)
        theirs = want[table][want[table]["run"] == "alpha"].drop(columns=["created_at"], errors="ignore")
        pd.testing.assert_frame_equal(ours, theirs.reset_index(drop=True), check_exact=True, obj=table)
    assert set(laptop.runs()["name"]) == {"alpha"}  # the export held only alpha


def _cli_fails_cleanly(laptop: Store, folder: Path, capsys, expect: str) -> None:
    before = _tables(laptop.path)
    capsys.readouterr()
    assert main(["import-cache", str(folder), "--db", str(laptop.path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and expect in err, err
    _assert_same(before, _tables(laptop.path))


def test_corrupt_parquet_file_exits_2_and_leaves_the_cache_alone(source: Store, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "out"
    assert main(["export", "--out", str(folder), "--db", str(source.path)]) == 0
    laptop = Store(tmp_path / "laptop.duckdb")
    laptop.register_run(synthetic_run("gamma"))
    data = (folder / "results.parquet").read_bytes()
    (folder / "results.parquet").write_bytes(data[: len(data) // 2])  # a truncated copy
    _cli_fails_cleanly(laptop, folder, capsys, "results.parquet")
    (folder / "results.parquet").write_bytes(b"not parquet at all")
    _cli_fails_cleanly(laptop, folder, capsys, "results.parquet")
    (folder / "results.parquet").unlink()
    _cli_fails_cleanly(laptop, folder, capsys, "missing")


def test_a_file_that_disagrees_with_the_manifest_is_refused(source: Store, tmp_path: Path, capsys) -> None:
    export_parquet(source, tmp_path / "out")
    export_parquet(source, tmp_path / "alpha_only", runs=["alpha"])
    laptop = Store(tmp_path / "laptop.duckdb")
    laptop.register_run(synthetic_run("gamma"))
    # A log_series file from another export: valid Parquet, but not the rows the manifest counted.
    (tmp_path / "out" / "log_series.parquet").write_bytes((tmp_path / "alpha_only" / "log_series.parquet").read_bytes())
    _cli_fails_cleanly(laptop, tmp_path / "out", capsys, "the manifest says")
    # The runs file put where checkpoints belong: wrong columns.
    (tmp_path / "out" / "checkpoints.parquet").write_bytes((tmp_path / "out" / "runs.parquet").read_bytes())
    _cli_fails_cleanly(laptop, tmp_path / "out", capsys, "do not match")


@pytest.mark.parametrize(
    ("manifest", "expect"),
    [
        ("{not json", "unreadable manifest"),
        (json.dumps({"format": "something-else"}), "not a cache export manifest"),
        (None, "schema version 99"),
        ("", "unreadable manifest"),
    ],
)
def test_bad_manifest_exits_2_and_leaves_the_cache_alone(
    source: Store, tmp_path: Path, capsys, manifest: str | None, expect: str
) -> None:
    folder = tmp_path / "out"
    written = export_parquet(source, folder)
    laptop = Store(tmp_path / "laptop.duckdb")
    laptop.register_run(synthetic_run("gamma"))
    text = json.dumps({**written, "schema_version": 99}) if manifest is None else manifest
    (folder / "manifest.json").write_text(text)
    _cli_fails_cleanly(laptop, folder, capsys, expect)


def test_results_for_other_weights_are_refused_and_nothing_is_written(source: Store, tmp_path: Path, capsys) -> None:
    export_parquet(source, tmp_path / "out")
    laptop = Store(tmp_path / "laptop.duckdb")
    laptop.register_run(synthetic_run("beta", offset=0.4))
    other = synthetic_run("alpha")  # same run name, but step 10 holds other weights here
    ckpts = [Checkpoint(c.step, c.path, c.tokens, "fp-retrained" if c.step == 10 else c.fingerprint)
             for c in other.checkpoints]  # fmt: skip
    laptop.register_run(Run(other.name, other.source, ckpts, other.log))
    _cli_fails_cleanly(laptop, tmp_path / "out", capsys, "run 'alpha' step 10: the export's results are for other")
    assert not len(laptop.results(["alpha", "beta"]))


def test_export_of_an_unknown_run_or_a_missing_cache_is_one_line(source: Store, tmp_path: Path, capsys) -> None:
    assert main(["export", "--out", str(tmp_path / "o"), "--run", "nope", "--db", str(source.path)]) == 2
    assert "unknown run 'nope'" in capsys.readouterr().err
    assert main(["export", "--out", str(tmp_path / "o"), "--db", str(tmp_path / "absent.duckdb")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no cache file" in err
    assert main(["import-cache", str(tmp_path / "nowhere"), "--db", str(source.path)]) == 2
    assert "no such folder" in capsys.readouterr().err


HOSTILE = "alpha') OR 1=1; DROP TABLE results; --"


def test_a_hostile_run_name_and_folder_are_data_not_sql(source: Store, tmp_path: Path) -> None:
    source.register_run(synthetic_run(HOSTILE, offset=0.2))
    _results(source, HOSTILE, (10,))
    folder = tmp_path / "o'ut; DROP TABLE runs; --"
    manifest = export_parquet(source, folder, runs=[HOSTILE])
    # Only the hostile run's own rows: had the name been spliced in, the OR 1=1 would export every run.
    assert manifest["rows"]["runs"] == 1 and manifest["rows"]["results"] == 1
    assert manifest["rows"]["checkpoints"] == 5
    fresh = Store(tmp_path / "laptop.duckdb")
    report = import_parquet(fresh, folder)
    assert report.added == sum(manifest["rows"].values())
    assert list(fresh.runs()["name"]) == [HOSTILE]
    assert fresh.results(HOSTILE)["value"].tolist() == source.results(HOSTILE)["value"].tolist()
    # Both caches still hold every table, and the source its other runs' results.
    assert set(_tables(fresh.path)) == set(TABLES)
    assert set(source.results(["alpha", "beta"])["run"]) == {"alpha", "beta"}


def test_a_table_name_outside_the_allow_list_is_refused_before_any_sql(source: Store, tmp_path: Path) -> None:
    export_parquet(source, tmp_path / "out")
    before = _tables(source.path)
    files = {table: tmp_path / "out" / f"{table}.parquet" for table in TABLES}
    files["results; DROP TABLE runs; --"] = files.pop("results")
    rows = dict.fromkeys(files, 0)
    with pytest.raises(ValueError, match="one file per table"):
        source.import_tables(files, rows)
    with pytest.raises(ValueError, match="not a table export moves"):
        source._exchange_select("runs; DROP TABLE results", None)
    _assert_same(before, _tables(source.path))
