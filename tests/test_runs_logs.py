"""Training log readers: trainer_state.json, CSV, JSON lines, TensorBoard; merging and finding logs."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from analysis.runs import Checkpoint, find_logs, merge_logs, metric_name, read_log
from analysis.runs.base import empty_log


def as_dict(frame: pd.DataFrame, metric: str) -> dict[int, float]:
    rows = frame[frame["metric"] == metric]
    return dict(zip(rows["step"].tolist(), rows["value"].tolist(), strict=True))


def one_line_error(path: Path, match: str) -> str:
    with pytest.raises(ValueError, match=match) as err:
        read_log(path)
    message = str(err.value)
    assert "\n" not in message and path.name in message
    return message


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("loss", "train/loss"),
        ("train_loss", "train/loss"),
        ("eval_loss", "eval/loss"),
        ("val_loss", "eval/loss"),
        ("valid_loss", "eval/loss"),
        ("lr", "train/learning_rate"),
        ("learning_rate", "train/learning_rate"),
        ("grad_norm", "train/grad_norm"),
        ("eval_accuracy", "eval/accuracy"),
        ("perplexity", "train/perplexity"),
        ("train/loss", "train/loss"),
        ("Loss/valid", "Loss/valid"),
        ("epoch", None),
        ("total_flos", None),
        ("eval_runtime", None),
        ("train_samples_per_second", None),
        ("train/epoch", None),
        ("step", None),
        ("trainer/global_step", None),
        ("num_input_tokens_seen", None),
        ("tokens", None),
    ],
)
def test_metric_name(key: str, expected: str | None) -> None:
    assert metric_name(key) == expected


def write_trainer_state(path: Path, history: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"global_step": 3, "log_history": history}))
    return path


def test_trainer_state_mapping_and_skips(tmp_path: Path) -> None:
    history = [
        {"loss": 3.5, "learning_rate": 1e-3, "grad_norm": 2.0, "epoch": 0.1, "step": 1, "num_input_tokens_seen": 512},
        {"loss": 3.0, "learning_rate": 9e-4, "grad_norm": 1.5, "epoch": 0.2, "step": 2, "num_input_tokens_seen": 1024},
        {"eval_loss": 3.2, "eval_accuracy": 0.25, "eval_runtime": 1.2, "eval_samples_per_second": 9.0, "step": 2},
        {"train_loss": 3.25, "train_runtime": 5.0, "total_flos": 1e9, "epoch": 0.2, "step": 2},
    ]
    result = read_log(write_trainer_state(tmp_path / "trainer_state.json", history))
    frame = result.frame
    assert result.problems == []
    assert list(frame.columns) == ["step", "tokens", "metric", "value"]
    assert frame.dtypes.astype(str).tolist() == ["int64", "Int64", "string", "float64"]
    assert set(frame["metric"]) == {
        "train/loss",
        "train/learning_rate",
        "train/grad_norm",
        "eval/loss",
        "eval/accuracy",
    }
    assert as_dict(frame, "train/loss") == {1: 3.5, 2: 3.0}  # train_loss is the run's mean, not a step's loss
    assert as_dict(frame, "eval/loss") == {2: 3.2}
    # The eval entry has no token count of its own: it shares the one logged at its step.
    assert frame.loc[frame["metric"] == "eval/loss", "tokens"].tolist() == [1024]


def test_resumed_run_keeps_last_value_and_sorts(tmp_path: Path) -> None:
    history = [{"loss": v, "step": s} for s, v in [(1, 5.0), (2, 4.0), (3, 3.0), (2, 4.5), (3, 3.5), (4, 2.5)]]
    frame = read_log(write_trainer_state(tmp_path / "trainer_state.json", history)).frame
    assert frame["step"].tolist() == [1, 2, 3, 4]
    assert as_dict(frame, "train/loss") == {1: 5.0, 2: 4.5, 3: 3.5, 4: 2.5}


def test_csv_columns_steps_and_text(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    path.write_text(
        "Global_Step,loss,val_loss,lr,tokens,name,custom/metric\n"
        "20,2.0,,0.1,2000,a,7\n"
        "10,3.0,3.5,0.2,1000,a,8\n"
        "30,1.0,1.5,0.05,3000,b,9\n"
    )
    result = read_log(path)
    frame = result.frame
    assert result.problems == []
    assert as_dict(frame, "train/loss") == {10: 3.0, 20: 2.0, 30: 1.0}
    assert as_dict(frame, "eval/loss") == {10: 3.5, 30: 1.5}  # a blank cell is no value, not a problem
    assert as_dict(frame, "train/learning_rate") == {10: 0.2, 20: 0.1, 30: 0.05}
    assert as_dict(frame, "custom/metric") == {10: 8.0, 20: 7.0, 30: 9.0}
    assert frame["step"].is_monotonic_increasing
    assert not frame["metric"].str.contains("name").any()
    assert frame.drop_duplicates("step")["tokens"].tolist() == [1000, 2000, 3000]


@pytest.mark.parametrize("column", ["step", "global_step", "Iteration", "iter", "_step", "trainer/global_step"])
def test_csv_step_column_names(tmp_path: Path, column: str) -> None:
    path = tmp_path / "log.csv"
    path.write_text(f"{column},loss\n5,1.5\n6,1.25\n")
    assert as_dict(read_log(path).frame, "train/loss") == {5: 1.5, 6: 1.25}


def test_tsv_is_read(tmp_path: Path) -> None:
    path = tmp_path / "log.tsv"
    path.write_text("step\tloss\n1\t0.5\n")
    assert as_dict(read_log(path).frame, "train/loss") == {1: 0.5}


def test_nan_and_inf_dropped_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    path.write_text("step,loss,eval_loss\n1,nan,\n2,2.0,inf\n3,-inf,1.0\n4,1.0,\n")
    result = read_log(path)
    assert as_dict(result.frame, "train/loss") == {2: 2.0, 4: 1.0}
    assert as_dict(result.frame, "eval/loss") == {3: 1.0}
    [problem] = result.problems
    assert "dropped 3 NaN or infinite values" in problem and "train/loss: 2" in problem and "eval/loss: 1" in problem


def test_jsonl_nan_in_json_and_nested_records(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    path.write_text(
        '{"step": 1, "train": {"loss": 2.0}, "lr": NaN}\n{"step": 2, "train": {"loss": 1.0}, "note": "x"}\n'
    )
    result = read_log(path)
    assert as_dict(result.frame, "train/loss") == {1: 2.0, 2: 1.0}
    assert "train/learning_rate" not in set(result.frame["metric"])
    assert any("dropped 1 NaN" in p for p in result.problems)


def test_jsonl_broken_lines_are_skipped_with_a_problem(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": \n\n[1, 2]\n{"step": 3, "loss": 1.0}\n')
    result = read_log(path)
    assert as_dict(result.frame, "train/loss") == {1: 2.0, 3: 1.0}
    [problem] = result.problems
    assert "skipped 2 lines" in problem and "line 2" in problem


def test_json_list_and_json_lines_in_a_json_file(tmp_path: Path) -> None:
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps([{"iteration": 1, "loss": 2.0}, {"iteration": 2, "loss": 1.5}]))
    assert as_dict(read_log(listed).frame, "train/loss") == {1: 2.0, 2: 1.5}
    lines = tmp_path / "lines.json"
    lines.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n')
    assert as_dict(read_log(lines).frame, "train/loss") == {1: 2.0, 2: 1.5}


def test_bad_inputs_are_one_line_errors(tmp_path: Path) -> None:
    one_line_error(tmp_path / "missing.csv", "no such file")
    (tmp_path / "notes.txt").write_text("hello")
    one_line_error(tmp_path / "notes.txt", "unknown log format")
    (tmp_path / "binary.csv").write_bytes(bytes(range(256)) * 8)
    one_line_error(tmp_path / "binary.csv", "not a readable CSV|not a text file|no step column")
    (tmp_path / "nostep.csv").write_text("epoch,loss\n1,2.0\n")
    message = one_line_error(tmp_path / "nostep.csv", "no step column")
    assert "rename" in message
    (tmp_path / "onlystep.csv").write_text("step,name\n1,a\n2,b\n")
    one_line_error(tmp_path / "onlystep.csv", "no numeric columns")
    (tmp_path / "empty.csv").write_text("")
    one_line_error(tmp_path / "empty.csv", "empty file")
    (tmp_path / "broken.json").write_text("{this is not json")
    one_line_error(tmp_path / "broken.json", "not JSON lines")
    (tmp_path / "config.json").write_text('{"model_type": "olmoe"}')
    one_line_error(tmp_path / "config.json", "not a log")
    (tmp_path / "nostep.jsonl").write_text('{"loss": 1.0}\n')
    one_line_error(tmp_path / "nostep.jsonl", "no step field")
    (tmp_path / "latin1.jsonl").write_bytes(b"\xff\xfe\xfa")
    one_line_error(tmp_path / "latin1.jsonl", "not a text file")
    write_trainer_state(tmp_path / "state" / "trainer_state.json", []).write_text('{"global_step": 1}')
    one_line_error(tmp_path / "state" / "trainer_state.json", "no log_history")
    (tmp_path / "plain").mkdir()
    one_line_error(tmp_path / "plain", "without TensorBoard events")


def test_header_only_csv_is_empty_with_a_problem(tmp_path: Path) -> None:
    path = tmp_path / "new.csv"
    path.write_text("step,loss\n")
    result = read_log(path)
    assert result.frame.empty and result.problems == [f"{path}: no rows yet"]


def test_unicode_and_spaces_in_log_path(tmp_path: Path) -> None:
    path = tmp_path / "läufe mit leerzeichen" / "log ✓.csv"
    path.parent.mkdir()
    path.write_text("step,loss\n1,0.75\n")
    assert as_dict(read_log(path).frame, "train/loss") == {1: 0.75}


def write_events(folder: Path, scalars: dict[str, list[tuple[int, float]]]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(folder))
    for tag, points in scalars.items():
        for step, value in points:
            writer.add_scalar(tag, value, step)
    writer.close()


def test_tensorboard_round_trip(tmp_path: Path) -> None:
    loss = [(s, 4.0 / (s + 1) + 0.123456789) for s in range(0, 50, 10)]
    write_events(
        tmp_path / "runs" / "a",
        {
            "train/loss": loss,
            "eval_loss": [(20, 2.5), (40, 2.25)],
            "lr": [(0, 0.1), (10, float("nan"))],
            "tokens": [(s, s * 4096.0) for s in range(0, 50, 10)],
        },
    )
    [file] = list((tmp_path / "runs").rglob("*tfevents*"))
    for source in (file, tmp_path / "runs"):
        result = read_log(source)
        frame = result.frame
        # TensorBoard stores float32: compare with what float32 keeps.
        assert as_dict(frame, "train/loss") == {s: float(np.float32(v)) for s, v in loss}
        assert as_dict(frame, "eval/loss") == {20: 2.5, 40: 2.25}
        assert as_dict(frame, "train/learning_rate") == {0: pytest.approx(0.1)}
        assert frame.drop_duplicates("step")["tokens"].tolist() == [0, 40960, 81920, 122880, 163840]
        assert any("dropped 1 NaN" in p for p in result.problems)


def test_tensorboard_without_scalars_is_an_error(tmp_path: Path) -> None:
    folder = tmp_path / "tb"
    folder.mkdir()
    (folder / "events.out.tfevents.1.host").write_bytes(b"\x00garbage" * 10)
    one_line_error(folder / "events.out.tfevents.1.host", "no scalar values")


def test_merge_logs_later_wins_and_shares_tokens() -> None:
    first = pd.DataFrame(
        {
            "step": [1, 2],
            "tokens": pd.array([100, 200], dtype="Int64"),
            "metric": ["train/loss", "train/loss"],
            "value": [3.0, 2.0],
        }
    )
    second = pd.DataFrame(
        {
            "step": [2, 3],
            "tokens": pd.array([None, None], dtype="Int64"),
            "metric": ["train/loss", "eval/loss"],
            "value": [2.5, 1.0],
        }
    )
    merged = merge_logs([first, second])
    assert as_dict(merged, "train/loss") == {1: 3.0, 2: 2.5}
    assert merged.loc[merged["step"] == 2, "tokens"].tolist() == [200]
    assert merged.loc[merged["step"] == 3, "tokens"].isna().all()
    assert merge_logs([]).equals(empty_log())


def test_find_logs_order_and_exclusions(tmp_path: Path) -> None:
    for step in (2, 4):
        write_trainer_state(tmp_path / f"checkpoint-{step}" / "trainer_state.json", [{"step": step, "loss": 1.0}])
    write_events(tmp_path / "checkpoint-4" / "runs", {"loss": [(1, 1.0)]})
    write_events(tmp_path / "runs" / "jan01", {"loss": [(1, 1.0)]})
    (tmp_path / "metrics.csv").write_text("step,loss\n1,1\n")
    (tmp_path / "notes.md").write_text("not a log")
    checkpoints = [Checkpoint(s, str(tmp_path / f"checkpoint-{s}")) for s in (2, 4)]
    found = find_logs(tmp_path, checkpoints)
    [events] = list((tmp_path / "runs").rglob("*tfevents*"))
    assert found == [
        events.resolve(),
        tmp_path.resolve() / "metrics.csv",
        tmp_path / "checkpoint-4" / "trainer_state.json",
    ]


step_lists = st.lists(st.integers(min_value=0, max_value=10**12), min_size=1, max_size=30, unique=True)
finite = st.floats(allow_nan=False, allow_infinity=False)


@settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=step_lists, data=st.data())
def test_csv_round_trip_property(tmp_path: Path, steps: list[int], data: st.DataObject) -> None:
    losses = data.draw(st.lists(finite, min_size=len(steps), max_size=len(steps)))
    evals = data.draw(st.lists(st.none() | finite, min_size=len(steps), max_size=len(steps)))
    path = tmp_path / "prop.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["step", "loss", "eval_loss"])
        for row in zip(steps, losses, evals, strict=True):
            writer.writerow([row[0], repr(row[1]), "" if row[2] is None else repr(row[2])])
    result = read_log(path)
    assert result.problems == []
    assert as_dict(result.frame, "train/loss") == dict(zip(steps, losses, strict=True))
    expected_eval = {s: v for s, v in zip(steps, evals, strict=True) if v is not None}
    assert as_dict(result.frame, "eval/loss") == expected_eval
    assert result.frame["step"].is_monotonic_increasing
    assert all(math.isfinite(v) for v in result.frame["value"])
