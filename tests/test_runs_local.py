"""Local run folders: every checkpoint layout, fingerprints, bad input, and a real HF Trainer run."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from analysis.models import load_model
from analysis.runs import (
    Checkpoint,
    checkpoint_parts,
    discover_checkpoints,
    fill_tokens,
    find_logs,
    fingerprint,
    load_run,
    parse_step_name,
)
from analysis.runs.local import as_model_folder, read_safetensors_header
from tests.factories import make_trainer_output, save_tiny_checkpoint, tiny_model_and_tokenizer


def fake_checkpoint(folder: Path, *, config: bool = True, weights: bool = True, name: str = "w") -> Path:
    """A folder that looks like a save_pretrained output, with a 2x2 tensor instead of a model."""
    folder.mkdir(parents=True, exist_ok=True)
    if config:
        (folder / "config.json").write_text(json.dumps({"model_type": "olmoe", "architectures": ["OlmoeForCausalLM"]}))
    if weights:
        save_file({name: torch.zeros(2, 2)}, str(folder / "model.safetensors"))
    return folder


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("checkpoint-200", (200, None)),
        ("step_100", (100, None)),
        ("step100", (100, None)),
        ("global_step300", (300, None)),
        ("iter_0000200", (200, None)),
        ("step1000-tokens4B", (1000, 4_000_000_000)),
        ("step1000-tokens4194M", (1000, 4_194_000_000)),
        ("step5-tokens123", (5, 123)),
        ("step7-tokens2K", (7, 2_000)),
        ("step7-tokens1T", (7, 10**12)),
        ("step10-tokens1.5B", (10, 1_500_000_000)),
        ("stage1-step1000-tokens5B", (1000, 5_000_000_000)),
        ("step_100.safetensors", (100, None)),
        ("model_step100.bin", (100, None)),
        ("100.safetensors", (100, None)),
        ("STEP10", (10, None)),
    ],
)
def test_parse_step_name(name: str, expected: tuple[int, int | None]) -> None:
    assert parse_step_name(name) == expected


@pytest.mark.parametrize(
    "name", ["main", "runs", "v2", "model.safetensors", "pytorch_model.bin", "model-00001-of-00002.safetensors", ""]
)
def test_parse_step_name_rejects_other_names(name: str) -> None:
    assert parse_step_name(name) is None


@pytest.mark.parametrize("pattern", ["checkpoint-{}", "step_{}", "step{}", "global_step{}", "{}"])
def test_discover_folder_layouts_sorted_by_step(tmp_path: Path, pattern: str) -> None:
    for step in (3000, 10, 200):
        fake_checkpoint(tmp_path / pattern.format(step))
    (tmp_path / "runs").mkdir()  # a non-step folder is not a checkpoint
    checkpoints, problems = discover_checkpoints(tmp_path)
    assert problems == []
    assert [c.step for c in checkpoints] == [10, 200, 3000]
    assert [c.path for c in checkpoints] == [str((tmp_path / pattern.format(s)).resolve()) for s in (10, 200, 3000)]
    assert all(Path(c.path).is_absolute() and c.tokens is None and c.fingerprint for c in checkpoints)


def test_discover_olmo_token_folders(tmp_path: Path) -> None:
    for name in ("step1000-tokens4B", "step2000-tokens4194M", "step3000-tokens123"):
        fake_checkpoint(tmp_path / name)
    checkpoints, _ = discover_checkpoints(tmp_path)
    assert [(c.step, c.tokens) for c in checkpoints] == [(1000, 4 * 10**9), (2000, 4194 * 10**6), (3000, 123)]


def test_discover_files_named_by_step(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "olmoe"}')
    save_file({"w": torch.ones(2)}, str(tmp_path / "step_100.safetensors"))
    save_file({"w": torch.ones(2)}, str(tmp_path / "300.safetensors"))
    torch.save({"w": torch.ones(2)}, tmp_path / "model_step200.bin")
    torch.save({"lr": 1.0}, tmp_path / "training_args.bin")
    checkpoints, problems = discover_checkpoints(tmp_path)
    assert problems == []
    names = ["step_100.safetensors", "model_step200.bin", "300.safetensors"]
    assert [(c.step, c.path) for c in checkpoints] == [
        (s, str(tmp_path.resolve() / n)) for s, n in zip((100, 200, 300), names, strict=True)
    ]
    assert checkpoint_parts(checkpoints[0].path) == (tmp_path.resolve(), tmp_path.resolve() / names[0])
    assert checkpoint_parts(str(tmp_path)) == (tmp_path, None)


def test_file_per_step_checkpoint_loads_through_a_model_folder(tmp_path: Path) -> None:
    root = save_tiny_checkpoint(tmp_path / "run", seed=3)
    (root / "model.safetensors").rename(root / "step_5.safetensors")
    [checkpoint], problems = discover_checkpoints(root)
    assert (checkpoint.step, problems) == (5, [])
    folder = as_model_folder(checkpoint.path, tmp_path / "scratch")
    assert folder != root and (folder / "model.safetensors").resolve() == root.resolve() / "step_5.safetensors"
    model, _ = load_model(folder, device="cpu")
    reference, _ = tiny_model_and_tokenizer(seed=3)
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    assert as_model_folder(root, tmp_path / "scratch") == root


def test_root_that_is_one_model_folder(tmp_path: Path) -> None:
    plain = fake_checkpoint(tmp_path / "final model")
    step_named = fake_checkpoint(tmp_path / "step_700")
    assert [(c.step, c.path) for c in discover_checkpoints(plain)[0]] == [(0, str(plain.resolve()))]
    assert [c.step for c in discover_checkpoints(step_named)[0]] == [700]


def test_missing_root_and_file_root_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no such folder") as missing:
        discover_checkpoints(tmp_path / "nope")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ValueError, match="is a file") as a_file:
        discover_checkpoints(tmp_path / "file.txt")
    for err in (missing, a_file):
        assert "\n" not in str(err.value) and str(tmp_path) in str(err.value)


def test_empty_folder_gives_a_problem(tmp_path: Path) -> None:
    checkpoints, problems = discover_checkpoints(tmp_path)
    assert checkpoints == []
    assert len(problems) == 1 and "no checkpoints found" in problems[0]


def test_step_files_without_a_config_are_reported(tmp_path: Path) -> None:
    save_file({"w": torch.ones(2)}, str(tmp_path / "step_100.safetensors"))
    checkpoints, problems = discover_checkpoints(tmp_path)
    assert checkpoints == []
    assert len(problems) == 1 and "1 step-named weights files but no config.json" in problems[0]


def test_bad_checkpoints_are_skipped_with_one_line_each(tmp_path: Path) -> None:
    fake_checkpoint(tmp_path / "checkpoint-100")
    fake_checkpoint(tmp_path / "checkpoint-200", config=False)
    fake_checkpoint(tmp_path / "checkpoint-300", weights=False)
    broken_config = fake_checkpoint(tmp_path / "checkpoint-400")
    (broken_config / "config.json").write_text("{not json")
    truncated = fake_checkpoint(tmp_path / "checkpoint-500")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[:-5])
    garbage = fake_checkpoint(tmp_path / "checkpoint-600")
    (garbage / "model.safetensors").write_bytes(b"\xff" * 64)
    checkpoints, problems = discover_checkpoints(tmp_path)
    assert [c.step for c in checkpoints] == [100]
    assert len(problems) == 5 and all("\n" not in p for p in problems)
    expected = {
        200: "no config.json; skipped (save it with save_pretrained)",
        300: "no weights",
        400: "config.json is not valid JSON",
        500: "truncated safetensors file",
        600: "corrupt safetensors header",
    }
    for step, text in expected.items():
        [line] = [p for p in problems if f"checkpoint-{step}:" in p]
        assert text in line


def test_read_safetensors_header_checks_size(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    save_file({"w": torch.zeros(4)}, str(path))
    assert json.loads(read_safetensors_header(path))["w"]["shape"] == [4]
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(ValueError, match=r"a\.safetensors: truncated"):
        read_safetensors_header(path)


def test_duplicate_steps_keep_one_and_report(tmp_path: Path) -> None:
    fake_checkpoint(tmp_path / "checkpoint-100")
    fake_checkpoint(tmp_path / "step_100")
    checkpoints, problems = discover_checkpoints(tmp_path)
    assert [Path(c.path).name for c in checkpoints] == ["checkpoint-100"]
    assert len(problems) == 1 and "step 100 appears twice" in problems[0]


def test_unicode_and_spaces_in_paths(tmp_path: Path) -> None:
    root = tmp_path / "rüns" / "my run ✓"
    fake_checkpoint(root / "checkpoint-5")
    (root / "train log.csv").write_text("step,loss\n5,1.25\n")
    run = load_run(root)
    assert run.name == "my run ✓"
    assert [c.path for c in run.checkpoints] == [str((root / "checkpoint-5").resolve())]
    assert run.log["value"].tolist() == [1.25]


def test_fingerprint_stable_and_sensitive(tmp_path: Path) -> None:
    folder = fake_checkpoint(tmp_path / "checkpoint-1")
    first = fingerprint(folder)
    assert fingerprint(folder) == first
    # Training state and logs are not part of what a checkpoint computes.
    (folder / "trainer_state.json").write_text("{}")
    (folder / "optimizer.pt").write_bytes(b"x" * 10)
    assert fingerprint(folder) == first
    weights = folder / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    touched = fingerprint(folder)
    assert touched != first
    # Same size and mtime, different tensor name: only the header hash can tell.
    stat = weights.stat()
    save_file({"v": torch.zeros(2, 2)}, str(weights))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert weights.stat().st_size == stat.st_size
    assert fingerprint(folder) != touched
    (folder / "config.json").write_text('{"model_type": "llama"}')
    assert fingerprint(folder) not in (first, touched)


def test_fingerprint_survives_a_move_and_covers_shared_config(tmp_path: Path) -> None:
    folder = fake_checkpoint(tmp_path / "a" / "checkpoint-1")
    before = fingerprint(folder)
    moved = tmp_path / "b"
    shutil.move(tmp_path / "a", moved)
    assert fingerprint(moved / "checkpoint-1") == before
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "config.json").write_text("{}")
    save_file({"w": torch.ones(1)}, str(tmp_path / "files" / "step_1.safetensors"))
    file_before = fingerprint(tmp_path / "files" / "step_1.safetensors")
    (tmp_path / "files" / "train.csv").write_text("step,loss\n1,2\n")
    assert fingerprint(tmp_path / "files" / "step_1.safetensors") == file_before
    (tmp_path / "files" / "config.json").write_text('{"hidden_size": 8}')
    assert fingerprint(tmp_path / "files" / "step_1.safetensors") != file_before
    with pytest.raises(ValueError, match="no such checkpoint"):
        fingerprint(tmp_path / "missing")


def test_fill_tokens_exact_interpolated_and_outside() -> None:
    log = pd.DataFrame(
        {"step": [10, 20, 20], "tokens": pd.array([1000, 3000, None], dtype="Int64"), "metric": "m", "value": 1.0}
    )
    checkpoints = [Checkpoint(step, f"/c{step}") for step in (5, 10, 15, 20, 30)] + [Checkpoint(12, "/x", tokens=7)]
    filled = fill_tokens(checkpoints, log)
    assert [c.tokens for c in filled] == [None, 1000, 2000, 3000, None, 7]


def test_load_run_logs_override_and_bad_log_is_a_problem(tmp_path: Path) -> None:
    fake_checkpoint(tmp_path / "step_10")
    (tmp_path / "metrics.csv").write_text("step,loss,tokens\n10,2.0,640\n20,1.5,1280\n")
    (tmp_path / "broken.jsonl").write_text("this is not json\n")
    override = tmp_path / "elsewhere.jsonl"
    override.write_text('{"step": 20, "loss": 1.25}\n')
    run = load_run(tmp_path, name="mine", log=override)
    assert run.name == "mine" and run.source == str(tmp_path.resolve())
    assert run.log.set_index("step")["value"].to_dict() == {10: 2.0, 20: 1.25}
    assert run.checkpoints[0].tokens == 640  # from the log: the folder name has no tokens
    assert run.config == {"model_type": "olmoe", "architectures": ["OlmoeForCausalLM"]}
    [problem] = run.problems
    assert "broken.jsonl" in problem and "log skipped" in problem
    with pytest.raises(ValueError, match="no such file"):
        load_run(tmp_path, log=tmp_path / "missing.csv")


def test_load_run_needs_checkpoints_or_a_log(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no usable checkpoints or training log") as err:
        load_run(tmp_path)
    assert "\n" not in str(err.value)
    log = tmp_path.parent / f"{tmp_path.name}-log.csv"
    log.write_text("step,loss\n1,3.0\n")
    run = load_run(tmp_path, log=log)
    assert run.checkpoints == [] and run.log["value"].tolist() == [3.0]


@pytest.fixture(scope="module")
def trainer_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_trainer_output(tmp_path_factory.mktemp("trainer") / "out", steps=(2, 4, 6))


@pytest.mark.slow
def test_trainer_output_loads_with_exact_log(trainer_run: Path) -> None:
    run = load_run(trainer_run)
    assert run.problems == []
    assert [c.step for c in run.checkpoints] == [2, 4, 6]
    assert [Path(c.path).name for c in run.checkpoints] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert len({c.fingerprint for c in run.checkpoints}) == 3
    history = json.loads((trainer_run / "checkpoint-6" / "trainer_state.json").read_text())["log_history"]
    expected = {entry["step"]: entry["loss"] for entry in history if "loss" in entry}
    assert sorted(expected) == [1, 2, 3, 4, 5, 6]
    loss = run.log[run.log["metric"] == "train/loss"]
    assert dict(zip(loss["step"].tolist(), loss["value"].tolist(), strict=True)) == expected
    seen = {entry["step"]: entry["num_input_tokens_seen"] for entry in history if "loss" in entry}
    assert [c.tokens for c in run.checkpoints] == [seen[2], seen[4], seen[6]]
    assert set(run.log["metric"]) == {"train/loss", "train/learning_rate", "train/grad_norm"}
    assert run.config["model_type"] == "olmoe"


@pytest.mark.slow
def test_find_logs_uses_the_latest_trainer_state(trainer_run: Path) -> None:
    checkpoints, _ = discover_checkpoints(trainer_run)
    assert find_logs(trainer_run, checkpoints) == [trainer_run.resolve() / "checkpoint-6" / "trainer_state.json"]
