"""FLOPs as an x-axis: parameter counts read off safetensors headers, the 6ND column, and the fallback rule."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from analysis.flops import add_flops_column, count_parameters, flops_axis, run_parameter_count
from tests.factories import save_tiny_checkpoint, tiny_model_and_tokenizer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "step_10")


def test_counts_match_the_model_and_moe_experts_count_at_top_k_over_n(checkpoint: Path) -> None:
    model, _ = tiny_model_and_tokenizer()
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)
    config = json.loads((checkpoint / "config.json").read_text())
    share = config["num_experts_per_tok"] / config["num_experts"]
    count = count_parameters(checkpoint)
    assert count.total == total
    assert count.active == round(total - experts * (1 - share)) < total
    assert count.source == "model.safetensors"


def test_a_dense_config_counts_every_parameter_and_a_weights_file_uses_its_folders_config(tmp_path, checkpoint):
    dense = tmp_path / "dense"
    shutil.copytree(checkpoint, dense)
    config = json.loads((dense / "config.json").read_text())
    del config["num_experts"], config["num_experts_per_tok"]
    (dense / "config.json").write_text(json.dumps(config))
    assert count_parameters(dense).active == count_parameters(dense).total
    single = tmp_path / "flat"
    single.mkdir()
    shutil.copy(checkpoint / "config.json", single / "config.json")
    shutil.copy(checkpoint / "model.safetensors", single / "step_20.safetensors")
    from_file = count_parameters(single / "step_20.safetensors")
    assert (from_file.active, from_file.source) == (count_parameters(checkpoint).active, "step_20.safetensors")


@pytest.mark.parametrize("make", ["missing", "bin_only", "broken_header", "lfs_pointer"])
def test_checkpoints_without_a_readable_header_are_one_line_errors(tmp_path: Path, make: str) -> None:
    folder = tmp_path / "step_1"
    if make != "missing":
        folder.mkdir()
    if make == "bin_only":
        (folder / "pytorch_model.bin").write_bytes(b"not read")
    if make == "broken_header":
        (folder / "model.safetensors").write_bytes((50).to_bytes(8, "little") + b"{not json")
    if make == "lfs_pointer":
        (folder / "model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 9\n")
    with pytest.raises(ValueError) as err:
        count_parameters(folder)
    assert "\n" not in str(err.value) and str(folder) in str(err.value)
    count, why = run_parameter_count([str(folder)])
    assert count is None and why.startswith("model size unknown (") and "\n" not in why


def test_run_parameter_count_uses_the_last_checkpoint_and_explains_hub_runs(checkpoint: Path) -> None:
    assert run_parameter_count(["/nowhere/step_1", str(checkpoint)]) == (count_parameters(checkpoint).active, "")
    assert run_parameter_count(["hf://org/model@step1"]) == (
        None, "model size unknown for a hub run (its weights are not here)",
    )  # fmt: skip
    assert run_parameter_count([]) == (None, "no checkpoints to read the model size from")


def test_flops_column_is_six_n_d_and_missing_where_a_count_or_tokens_is_unknown() -> None:
    frame = pd.DataFrame({"run": ["a", "a", "b", "c"], "tokens": [100, None, 100, 100], "value": 1.0})
    out = add_flops_column(frame, {"a": 1000, "b": None})
    assert out["flops"].iloc[0] == 6 * 1000 * 100
    assert out["flops"].iloc[1:].isna().all()  # no tokens; no count; run not in the mapping
    assert "flops" not in frame  # the input is left alone
    empty = add_flops_column(pd.DataFrame({"run": pd.Series(dtype=str), "tokens": pd.Series(dtype=str)}), {})
    assert empty.empty and "flops" in empty  # a run without a log: nothing to multiply, no error
    with pytest.raises(ValueError, match="needs a run column"):
        add_flops_column(pd.DataFrame({"tokens": [1]}), {})


def test_flops_axis_falls_back_to_tokens_then_steps_and_says_why_in_one_line() -> None:
    assert flops_axis({"a": 10, "b": 20}, {"a": True, "b": True}) == ("flops", "")
    x, note = flops_axis({"a": 10, "b": None}, {"a": True, "b": True}, {"b": "model size unknown for a hub run"})
    assert x == "tokens"
    assert note == "No FLOPs for run 'b': model size unknown for a hub run; x-axis shows tokens instead."
    x, note = flops_axis({"a": 10, "b": 20}, {"a": True, "b": False})
    assert (x, note) == ("step", "No FLOPs for run 'b': no token counts; x-axis shows step instead.")
    x, note = flops_axis({"a": None, "b": None}, {"a": True, "b": True})
    assert x == "tokens" and "(and 1 more)" in note and "\n" not in note
