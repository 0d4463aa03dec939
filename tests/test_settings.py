"""Settings of a metric: labels, picking one per metric, and never averaging two settings into one series."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.runs.base import Checkpoint, Run
from analysis.settings import label_settings, select_settings, setting_labels, setting_params, settings_table
from analysis.store import ResultRow, Store, params_hash

ALL = {"config": {"n_probes": 16, "subset": "all"}, "seed": 0, "version": "1"}
LAYER0 = {"config": {"n_probes": 16, "subset": "layer:0"}, "seed": 0, "version": "1"}


def _rows(run: str, metric: str, params: dict, values: dict[int, float]) -> list[dict]:
    text = json.dumps(params, sort_keys=True)
    return [
        {"run": run, "step": s, "tokens": s * 512, "metric": metric, "value": v, "stderr": 0.1,
         "params_hash": params_hash(params), "params": text}
        for s, v in values.items()
    ]  # fmt: skip


def _frame(*parts: list[dict]) -> pd.DataFrame:
    return pd.DataFrame([row for part in parts for row in part])


def test_labels_name_only_the_keys_that_differ() -> None:
    labels = setting_labels(
        {
            "h1": {"task": "arc_easy", "num_fewshot": 0, "limit": 200, "seed": 0},
            "h2": {"task": "arc_easy", "num_fewshot": 5, "limit": 200, "seed": 0},
            "h3": {"task": "arc_easy", "num_fewshot": 5, "limit": None, "seed": 0},
        }
    )
    assert labels == {"h1": "0-shot, limit 200", "h2": "5-shot, limit 200", "h3": "5-shot, all documents"}
    assert setting_labels({"a": ALL, "b": LAYER0}) == {"a": "subset=all", "b": "subset=layer:0"}
    assert setting_labels({"only": {"num_fewshot": 5}}) == {"only": ""}  # nothing to tell apart
    assert setting_labels({}) == {}


def test_labels_are_deterministic_distinct_and_hide_provenance() -> None:
    a = {"imported_from": "/evals/a.json", "model_args": "pretrained=/m,revision=step10,dtype=float32"}
    b = {"imported_from": "/evals/b.json", "model_args": "pretrained=/m,revision=step20,dtype=bfloat16"}
    assert setting_labels({"a": a, "b": b}) == {"a": "model_args.dtype=float32", "b": "model_args.dtype=bfloat16"}
    assert setting_params(a) == {"model_args": {"dtype": "float32"}}
    # The probe file's digest changes with its path: the path alone is named.
    p1 = {"data": "/probes/web.jsonl", "data_digest": "aaaa1111", "version": "1"}
    p2 = {"data": "/probes/code.jsonl", "data_digest": "bbbb2222", "version": "2"}
    assert setting_labels({"1": p1, "2": p2}) == {"1": "data=web.jsonl, v1", "2": "data=code.jsonl, v2"}
    # Settings that read alike (no parameters to compare) still get distinct labels.
    same = setting_labels({"abcdef123": {}, "fedcba987": {}})
    assert len(set(same.values())) == 2 and same == setting_labels({"fedcba987": {}, "abcdef123": {}})


def test_settings_table_counts_checkpoints_per_setting() -> None:
    frame = _frame(
        _rows("a", "hessian_trace", ALL, {10: 1.0, 20: 2.0, 30: 3.0}),
        _rows("b", "hessian_trace", ALL, {10: 1.5, 20: np.nan}),  # a NaN is not a checkpoint with a value
        _rows("a", "hessian_trace", LAYER0, {10: 9.0, 20: 8.0}),
        _rows("a", "other", {}, {10: 0.0}),
    )
    table = settings_table(frame)
    assert list(table.columns) == ["metric", "params_hash", "setting", "n_checkpoints", "runs", "params"]
    rows = table[["metric", "setting", "n_checkpoints", "runs"]].values.tolist()
    assert rows == [
        ["hessian_trace", "subset=all", 4, 2],
        ["hessian_trace", "subset=layer:0", 2, 1],
        ["other", "", 1, 1],
    ]
    assert table.loc[0, "params"] == ALL and table.loc[0, "params_hash"] == params_hash(ALL)


def test_default_keeps_the_setting_with_most_checkpoints_for_every_run() -> None:
    frame = _frame(
        _rows("a", "hessian_trace", ALL, {10: 1.0, 20: 2.0}),
        _rows("b", "hessian_trace", ALL, {10: 1.5}),
        _rows("a", "hessian_trace", LAYER0, {10: 9.0, 20: 8.0}),
        _rows("b", "hessian_trace", LAYER0, {10: 7.0, 20: 6.0}),
    )
    picked = select_settings(frame)
    assert set(picked["setting"]) == {"subset=layer:0"}  # 4 checkpoints against 3, for both runs
    assert sorted(picked["value"]) == [6.0, 7.0, 8.0, 9.0]
    # A tie goes to the first label in order, whatever the row order.
    tie = _frame(_rows("a", "m", {"limit": 5}, {1: 1.0}), _rows("a", "m", {"limit": 2}, {1: 2.0}))
    assert select_settings(tie)["setting"].tolist() == ["limit 2"]
    assert select_settings(tie.iloc[::-1])["setting"].tolist() == ["limit 2"]


def test_explicit_pick_by_label_or_by_hash() -> None:
    frame = _frame(
        _rows("a", "hessian_trace", ALL, {10: 1.0, 20: 2.0, 30: 3.0}),
        _rows("a", "hessian_trace", LAYER0, {10: 9.0, 20: 8.0}),
        _rows("a", "toy/acc,none", {"num_fewshot": 0}, {10: 0.1}),
        _rows("a", "toy/acc,none", {"num_fewshot": 5}, {10: 0.5}),
    )
    by_label = select_settings(frame, {"hessian_trace": "subset=layer:0", "toy/acc,none": "5-shot"})
    by_hash = select_settings(frame, {"hessian_trace": params_hash(LAYER0), "toy/acc,none": "5-shot"})
    pd.testing.assert_frame_equal(by_label, by_hash)
    assert by_label.groupby("metric")["value"].apply(list).to_dict() == {
        "hessian_trace": [9.0, 8.0],
        "toy/acc,none": [0.5],
    }


def test_unknown_metric_or_setting_is_one_line_naming_the_choices() -> None:
    frame = _frame(_rows("a", "hessian_trace", ALL, {10: 1.0}), _rows("a", "hessian_trace", LAYER0, {10: 2.0}))
    with pytest.raises(ValueError, match=r"no setting 'subset=layer:1'; choose one of 'subset=all', 'subset=layer:0'"):
        select_settings(frame, {"hessian_trace": "subset=layer:1"})
    with pytest.raises(ValueError, match=r"no metric 'fisher_trace'.*several settings: hessian_trace") as err:
        select_settings(frame, {"fisher_trace": "subset=all"})
    assert "\n" not in str(err.value)


def test_frames_without_params_hash_pass_through() -> None:
    frame = pd.DataFrame({"run": ["a"], "step": [1], "metric": ["m"], "value": [1.0]})
    assert select_settings(frame) is frame
    assert label_settings(frame) is frame
    assert settings_table(frame)[["metric", "setting", "n_checkpoints"]].values.tolist() == [["m", "", 1]]


def test_two_settings_of_hessian_trace_are_two_series_never_averaged(tmp_path: Path) -> None:
    """Through the real store: each selection holds exactly one setting's stored values."""
    store = Store(tmp_path / "cache.duckdb")
    steps = [10, 20, 30]
    store.register_run(Run("a", "/runs/a", [Checkpoint(s, f"/runs/a/{s}", s * 512, f"fp-{s}") for s in steps]))
    everything = {s: 100.0 + s for s in steps}
    layer0 = {s: 1.0 + s / 100 for s in steps[:2]}
    rows = [ResultRow("a", s, "hessian_trace", v, f"fp-{s}", 0.5, 8, ALL) for s, v in everything.items()]
    rows += [ResultRow("a", s, "hessian_trace", v, f"fp-{s}", 0.5, 8, LAYER0) for s, v in layer0.items()]
    store.write_results(rows)
    frame = store.long_table(["a"])
    assert frame.groupby("step")["params_hash"].nunique().max() == 2  # both settings at steps 10 and 20

    series = {}
    for label in ("subset=all", "subset=layer:0"):
        picked = select_settings(frame, {"hessian_trace": label})
        assert picked["params_hash"].nunique() == 1 and set(picked["setting"]) == {label}
        series[label] = dict(zip(picked["step"], picked["value"], strict=True))
    assert series == {"subset=all": everything, "subset=layer:0": layer0}  # exact: nothing averaged
    assert dict(zip(*select_settings(frame)[["step", "value"]].T.values, strict=True)) == everything


def test_imported_results_of_one_configuration_are_one_series(tmp_path: Path) -> None:
    """One lm-eval result file per checkpoint: one setting, told apart from another shot count."""
    rows = []
    for step, value in ((10, 0.2), (20, 0.3), (30, 0.4)):
        for shots, bump in ((0, 0.0), (5, 0.1)):
            params = {
                "imported_from": f"/evals/{shots}shot/step{step}.json",
                "model_args": f"pretrained=/ckpt/{step},revision=step{step}",
                "num_fewshot": shots,
            }
            rows += _rows("a", "arc/acc,none", params, {step: value + bump})
    frame = _frame(rows)
    assert frame["params_hash"].nunique() == 6
    table = settings_table(frame)
    assert table[["setting", "n_checkpoints"]].values.tolist() == [["0-shot", 3], ["5-shot", 3]]
    five = select_settings(frame, {"arc/acc,none": "5-shot"})
    assert five["params_hash"].nunique() == 1
    assert five["value"].tolist() == [0.2 + 0.1, 0.3 + 0.1, 0.4 + 0.1]  # the 5-shot values, exactly
    # Imported twice (two copies of a file): one value per checkpoint is kept, never their mean.
    again = _frame(rows, _rows("a", "arc/acc,none", {"imported_from": "/copy.json", "num_fewshot": 0}, {10: 0.9}))
    kept = select_settings(again, {"arc/acc,none": "0-shot"})
    assert kept["step"].tolist() == [10, 20, 30] and kept["value"].iloc[0] in (0.2, 0.9)


def test_how_a_published_sweep_was_run_does_not_split_it_into_two_settings():
    """Pythia's 70M zero-shot files: some steps ran with use_accelerate=True, the others without it."""
    from analysis.settings import setting_params

    a = {"imported_from": "/x/70m_step1000.json", "num_fewshot": 0,
         "model_args": "use_accelerate=True,pretrained=EleutherAI/pythia-v1.1-70m,revision=step1000"}  # fmt: skip
    b = {"imported_from": "/x/70m_step33000.json", "num_fewshot": 0,
         "model_args": "pretrained=EleutherAI/pythia-v1.1-70m,revision=step33000"}  # fmt: skip
    assert setting_params(a) == setting_params(b) == {"num_fewshot": 0}
    c = {**b, "model_args": "pretrained=EleutherAI/pythia-v1.1-70m,revision=step33000,dtype=bfloat16"}
    assert setting_params(c) == {"num_fewshot": 0, "model_args": {"dtype": "bfloat16"}}  # a real setting stays


def test_a_value_from_an_older_version_of_a_metric_is_not_offered_as_a_setting():
    """hessian_trace moved to version 2 (stderrs over batch means): version-1 rows are out of date, not a choice."""
    import json

    import pandas as pd

    from analysis.settings import select_settings, settings_table

    def rows(run, steps, version, value, subset="all"):
        params = json.dumps({"version": version, "config": {"n_probes": 16, "subset": subset}})
        return pd.DataFrame(
            {"run": run, "step": steps, "metric": "hessian_trace", "value": value, "params_hash": f"{version}{subset}",
             "params": params}
        )  # fmt: skip

    frame = pd.concat(
        [
            rows("a", [1, 2, 3, 4], "1", 5.0),  # the old version had more checkpoints
            rows("a", [1, 2], "2", 7.0),
            rows("b", [1, 2, 3], "1", 5.0),  # a run not recomputed yet
            rows("a", [1, 2], "2", 1.0, subset="layer:0"),  # a real second setting stays
        ]
    )
    table = settings_table(frame)
    assert sorted(table["setting"]) == ["subset=all", "subset=layer:0"]
    kept = select_settings(frame)
    assert kept["value"].tolist() == [7.0, 7.0] and set(kept["run"]) == {"a"}
    assert select_settings(frame, {"hessian_trace": "subset=layer:0"})["value"].tolist() == [1.0, 1.0]
