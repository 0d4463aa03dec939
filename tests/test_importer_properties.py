"""Property tests of the log and lm-eval result importers.

Whatever bytes or JSON they are given, the importers either return clean data (whole steps within
2**53, finite values, one-line problems naming the file) or raise ValueError with one line naming
the file; never another exception. Valid generated logs and result files read back exactly, with
NaN and infinite values dropped and reported as documented.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from analysis.evals.lmeval import parse_results_file
from analysis.runs import read_log
from analysis.runs.base import MAX_STEP

SETTINGS = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

LOG_NAMES = ("log.csv", "log.tsv", "log.jsonl", "log.json", "trainer_state.json")

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=25,
)
# Keys that the readers look for, so that generated records reach past the first checks.
log_keys = st.sampled_from(["step", "global_step", "loss", "eval_loss", "tokens", "lr", "epoch", "train/acc", "x"])
log_records = st.dictionaries(log_keys | st.text(max_size=8), json_scalars, max_size=6)


def check_log(path: Path) -> pd.DataFrame | None:
    """Read a log; assert the contract on what comes back or on the error. Returns the frame."""
    try:
        result = read_log(path)
    except ValueError as err:
        message = str(err)
        assert "\n" not in message and str(path) in message, message
        return None
    frame = result.frame
    assert list(frame.columns) == ["step", "tokens", "metric", "value"]
    assert str(frame["step"].dtype) == "int64" and str(frame["tokens"].dtype) == "Int64"
    assert frame["step"].abs().le(MAX_STEP).all()
    assert frame["tokens"].dropna().abs().le(MAX_STEP).all()
    assert all(math.isfinite(v) for v in frame["value"])
    assert not frame.duplicated(["step", "metric"]).any()
    assert frame["step"].is_monotonic_increasing
    for problem in result.problems:
        assert "\n" not in problem and str(path) in problem, problem
    return frame


@SETTINGS
@given(name=st.sampled_from(LOG_NAMES), content=st.binary(max_size=300))
def test_any_bytes_give_a_log_or_one_line_error(tmp_path: Path, name: str, content: bytes) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    check_log(path)


LOG_ALPHABET = st.sampled_from('step,loss\t\n0123456789.eE-+naif"{}[]:')


@SETTINGS
@given(name=st.sampled_from(LOG_NAMES), content=st.text(alphabet=LOG_ALPHABET, max_size=200))
def test_log_like_text_gives_a_log_or_one_line_error(tmp_path: Path, name: str, content: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    check_log(path)


@SETTINGS
@given(records=st.lists(log_records, max_size=8), shape=st.sampled_from(["jsonl", "list", "trainer_state"]))
def test_any_json_records_give_a_log_or_one_line_error(tmp_path: Path, records: list[dict], shape: str) -> None:
    if shape == "jsonl":
        path = tmp_path / "log.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif shape == "list":
        path = tmp_path / "log.json"
        path.write_text(json.dumps(records))
    else:
        path = tmp_path / "trainer_state.json"
        path.write_text(json.dumps({"log_history": records, "global_step": 1}))
    check_log(path)


steps = st.lists(st.integers(min_value=0, max_value=MAX_STEP), min_size=1, max_size=20, unique=True)
values = st.floats(allow_nan=True, allow_infinity=True, width=64)


@SETTINGS
@given(steps=steps, data=st.data(), shape=st.sampled_from(["jsonl", "trainer_state"]))
def test_json_logs_round_trip_and_drop_non_finite(tmp_path: Path, steps: list[int], data, shape: str) -> None:
    losses = data.draw(st.lists(values, min_size=len(steps), max_size=len(steps)))
    tokens = data.draw(st.lists(st.integers(0, 10**13), min_size=len(steps), max_size=len(steps)))
    order = data.draw(st.permutations(range(len(steps))))  # logs need not be in step order
    records = [{"step": steps[i], "loss": losses[i], "num_input_tokens_seen": tokens[i]} for i in order]
    if shape == "jsonl":
        path = tmp_path / "log.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))  # NaN and Infinity as Python writes them
    else:
        path = tmp_path / "trainer_state.json"
        path.write_text(json.dumps({"log_history": records}))
    frame = check_log(path)
    assert frame is not None
    kept = {s: v for s, v in zip(steps, losses, strict=True) if math.isfinite(v)}
    rows = frame[frame["metric"] == "train/loss"]
    assert dict(zip(rows["step"].tolist(), rows["value"].tolist(), strict=True)) == kept
    assert dict(zip(rows["step"].tolist(), rows["tokens"].tolist(), strict=True)) == {
        s: t for s, t, v in zip(steps, tokens, losses, strict=True) if math.isfinite(v)
    }
    dropped = len(steps) - len(kept)
    problems = read_log(path).problems
    assert (f"dropped {dropped} NaN or infinite values" in " ".join(problems)) == (dropped > 0)


# --------------------------------------------------------------------------- lm-eval result files

metric_values = st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=5) | st.integers(-(10**30), 10**30)


@SETTINGS
@given(content=json_values | st.dictionaries(st.sampled_from(["results", "config", "n-shot", "versions"]), json_values))
@example(content={"results": {"": {"": 0, "\n": None}}})  # a metric named "\n" went into a problem message
def test_any_json_gives_results_or_one_line_error(tmp_path: Path, content) -> None:
    path = tmp_path / "results_step5.json"
    path.write_text(json.dumps(content))
    try:
        imported = parse_results_file(path)
    except ValueError as err:
        assert "\n" not in str(err) and str(path) in str(err)
        return
    assert imported.step == 5 or 0 <= imported.step <= MAX_STEP
    assert imported.rows
    for row in imported.rows:
        assert math.isfinite(row.value) and (row.stderr is None or math.isfinite(row.stderr))
    assert all("\n" not in p for p in imported.problems)


def _finite_float(value: float | int) -> bool:
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an integer beyond the float range
        return False


@SETTINGS
@given(
    results=st.dictionaries(
        st.text(st.characters(blacklist_categories=["Cs"]), min_size=1, max_size=10),
        st.dictionaries(st.sampled_from(["acc", "acc_norm", "exact_match", "alias", "sample_len"]), metric_values,
                        max_size=4),
        max_size=4,
    ),
    step=st.integers(0, MAX_STEP),
    legacy=st.booleans(),
)  # fmt: skip
@example(results={"0": {"acc": 1.7000000000000001e308}}, step=0, legacy=False)  # finite, near the float maximum
def test_result_files_round_trip(tmp_path: Path, results: dict, step: int, legacy: bool) -> None:
    filt = "" if legacy else ",none"
    data = {"results": {}, "config": {"model_args": f"pretrained=x,revision=step{step}"}}
    expected = {}
    for task, metrics in results.items():
        entry = {}
        for metric, value in metrics.items():
            key = metric if metric in ("alias", "sample_len") else f"{metric}{filt}"
            entry[key] = value
            if key == metric and metric in ("alias", "sample_len"):
                continue
            if isinstance(value, float | int) and not isinstance(value, bool) and _finite_float(value):
                expected[f"{task}/{metric},none"] = float(value)
        data["results"][task] = entry
    path = tmp_path / "results.json"
    path.write_text(json.dumps(data))
    if not expected:
        try:
            parse_results_file(path)
        except ValueError as err:
            assert "no numeric metric values" in str(err) and "\n" not in str(err)
            return
        raise AssertionError("a file without numeric values was imported")
    imported = parse_results_file(path)
    assert imported.step == step and imported.step_source == "model_args revision"
    assert {row.name: row.value for row in imported.rows} == expected
