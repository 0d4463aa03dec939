"""The dtype a checkpoint is computed in: the rule by device, its cache key, and a bf16-stored tiny checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from analysis import models
from analysis.jobs import JobSpec, run_job, submit
from analysis.jobs.metric_once import compute_once
from analysis.jobs.precision import item_purpose, load_dtype, with_dtypes
from analysis.jobs.spec import plan_items
from analysis.models import (
    compute_dtype_for,
    cpu_native_dtypes,
    load_model,
    parse_dtype,
    stored_dtype,
)
from analysis.runs.load import load_run
from analysis.settings import label_settings
from analysis.store import Store
from tests.factories import sum_texts, tiny_model_and_tokenizer

BF16, FP16, FP32, FP64 = torch.bfloat16, torch.float16, torch.float32, torch.float64
AVX2 = {"fpu", "sse2", "avx", "avx2", "fma"}  # the EPYC where bf16 was 3.2x slower than fp32
ZEN4 = AVX2 | {"avx512f", "avx512bw", "avx512_bf16"}
SAPPHIRE = ZEN4 | {"amx_bf16", "amx_tile", "avx512fp16"}


# --- the rule --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "native"),
    [
        (AVX2, set()),
        ({"avx512f", "avx512bw"}, set()),  # AVX512 alone still emulates bf16
        (ZEN4, {BF16}),
        ({"amx_bf16"}, {BF16}),
        (SAPPHIRE, {BF16, FP16}),
        ({"fp", "asimd", "bf16"}, {BF16}),  # arm64 /proc/cpuinfo "Features"
        (set(), set()),
    ],
)
def test_native_low_precision_from_cpu_flags(flags: set[str], native: set[torch.dtype]) -> None:
    assert cpu_native_dtypes(flags) == native


def test_this_machines_detection_reads_its_own_flags() -> None:
    flags = models._cpu_flags()
    assert cpu_native_dtypes() == cpu_native_dtypes(flags)
    assert ("avx512_bf16" in flags) <= (BF16 in cpu_native_dtypes())


@pytest.mark.parametrize(
    ("device", "stored", "purpose", "flags", "expected"),
    [
        # A CPU without native bf16/fp16: forward passes upcast once, to float32.
        ("cpu", BF16, "forward", AVX2, FP32),
        ("cpu", FP16, "forward", AVX2, FP32),
        ("cpu", FP32, "forward", AVX2, FP32),
        ("cpu", FP64, "forward", AVX2, FP64),
        # A CPU that multiplies bf16 natively keeps it, but not fp16 unless that is native too.
        ("cpu", BF16, "forward", ZEN4, BF16),
        ("cpu", FP16, "forward", ZEN4, FP32),
        ("cpu", FP16, "forward", SAPPHIRE, FP16),
        # Gradients and second derivatives: float32 or wider everywhere.
        ("cpu", BF16, "gradient", ZEN4, FP32),
        (torch.device("cuda"), BF16, "gradient", AVX2, FP32),
        (torch.device("cuda"), FP64, "gradient", AVX2, FP64),
        # CUDA runs forward passes in the stored dtype whatever the host CPU.
        (torch.device("cuda"), BF16, "forward", AVX2, BF16),
        ("cuda:1", FP16, "forward", AVX2, FP16),
        (torch.device("cuda"), FP32, "forward", SAPPHIRE, FP32),
        # An unknown stored dtype counts as float32.
        ("cpu", None, "forward", ZEN4, FP32),
        (torch.device("cuda"), None, "forward", ZEN4, FP32),
    ],
)
def test_compute_dtype_by_device_and_purpose(device, stored, purpose, flags, expected) -> None:
    got = compute_dtype_for(device, stored, purpose, cpu_dtypes=cpu_native_dtypes(flags))
    assert got == expected


@pytest.mark.parametrize("device", ["cpu", torch.device("cuda")])
@pytest.mark.parametrize("purpose", ["forward", "gradient"])
def test_an_explicit_dtype_always_wins(device, purpose: str) -> None:
    for requested, expected in (("bfloat16", BF16), ("float16", FP16), ("float32", FP32), (BF16, BF16)):
        got = compute_dtype_for(device, FP32, purpose, requested=requested, cpu_dtypes=frozenset())
        assert got == expected


@pytest.mark.parametrize("call", [
    lambda: parse_dtype("bf17"),
    lambda: compute_dtype_for("cpu", "bfloat16", requested="fp8"),
    lambda: compute_dtype_for("cpu", "half-ish"),
    lambda: compute_dtype_for("cpu", "bfloat16", "backward"),
])  # fmt: skip
def test_unknown_dtype_or_purpose_is_a_one_line_error(call) -> None:
    with pytest.raises(ValueError) as err:
        call()
    message = str(err.value)
    assert "\n" not in message and "unknown; use" in message


def test_a_job_with_an_unknown_dtype_is_refused_in_one_line() -> None:
    with pytest.raises(ValueError, match=r"^--dtype bf17: use float32, bfloat16 or float16$"):
        JobSpec(run="r", metrics=("heldout_loss",), dtype="bf17")


# --- checkpoints on disk ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory) -> Path:
    """A run of one tiny OLMoE checkpoint saved in bfloat16 (as pretraining checkpoints are), and a probe."""
    root = tmp_path_factory.mktemp("precision")
    model, tokenizer = tiny_model_and_tokenizer(seed=3)
    folder = root / "run" / "step_10"
    model.to(BF16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (root / "probe.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in sum_texts(8)))
    return root


def test_stored_dtype_reads_the_weights_header_then_the_config(bf16_run: Path, tmp_path: Path) -> None:
    assert stored_dtype(bf16_run / "run" / "step_10") == BF16
    model, _ = tiny_model_and_tokenizer()
    model.save_pretrained(tmp_path / "fp32")
    assert stored_dtype(tmp_path / "fp32") == FP32
    assert stored_dtype(tmp_path / "fp32" / "model.safetensors") == FP32  # a file-per-step checkpoint
    only_config = tmp_path / "bin"
    only_config.mkdir()
    (only_config / "config.json").write_text(json.dumps({"torch_dtype": "float16"}))
    assert stored_dtype(only_config) == FP16
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"\xff" * 4)
    assert stored_dtype(broken) is None  # loading names the problem; the rule treats it as float32
    assert stored_dtype(tmp_path / "absent") is None


def _no_native(monkeypatch) -> None:
    monkeypatch.setattr(models, "_cpu_flags", lambda: frozenset(AVX2))


def _native_bf16(monkeypatch) -> None:
    monkeypatch.setattr(models, "_cpu_flags", lambda: frozenset(ZEN4))


def _heldout_nll(folder: Path, probe: Path, dtype: torch.dtype) -> float:
    """Mean next-token NLL of the probe texts, one text at a time, the model loaded in ``dtype``."""
    model, tok = load_model(folder, device="cpu", dtype=dtype)
    total, count = 0.0, 0
    for line in probe.read_text().splitlines():
        ids = torch.tensor([tok(json.loads(line)["text"])["input_ids"]])
        with torch.no_grad():
            logits = model(ids).logits[0, :-1].float()
        total += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        count += ids.shape[1] - 1
    return total / count


def test_items_are_keyed_with_the_dtype_they_compute_in(bf16_run: Path, monkeypatch) -> None:
    request = JobSpec(run="run", metrics=("heldout_loss", "hessian_trace", "pathway_distance"),
                      data=str(bf16_run / "probe.jsonl"), device="cpu")  # fmt: skip
    checkpoint = bf16_run / "run" / "step_10"
    _no_native(monkeypatch)
    plain = with_dtypes(plan_items(request), request, checkpoint)
    assert [it.params["dtype"] for it in plain] == ["float32"] * 3
    assert load_dtype(plain, request) == FP32
    _native_bf16(monkeypatch)
    native = with_dtypes(plan_items(request), request, checkpoint)
    assert [it.params["dtype"] for it in native] == ["bfloat16", "float32", "bfloat16"]
    assert [item_purpose(it) for it in native] == ["forward", "gradient", "forward"]
    assert load_dtype(native, request) == BF16  # the gradient metric upcasts its own copy
    assert load_dtype(native[1:2], request) == FP32  # a unit of gradient metrics only loads in float32
    # The forward items' keys differ between the two settings; the gradient metric's does not.
    assert [a.params_hash == b.params_hash for a, b in zip(plain, native, strict=True)] == [False, True, False]
    on_gpu = with_dtypes(plan_items(request), request, checkpoint, device=torch.device("cuda"))
    assert [it.params["dtype"] for it in on_gpu] == ["bfloat16", "float32", "bfloat16"]
    forced = JobSpec(**{**request.to_dict(), "dtype": "float16"})
    assert {it.params["dtype"] for it in with_dtypes(plan_items(forced), forced, checkpoint)} == {"float16"}


def test_a_bf16_checkpoint_is_computed_in_float32_on_a_cpu_without_bf16(bf16_run: Path, tmp_path, monkeypatch) -> None:
    """The job loads the bf16 checkpoint upcast to float32, stores dtype=float32 with the value, and on a CPU
    with native bf16 computes the forward-only metric again in bf16 as a second setting."""
    store = Store(tmp_path / "cache.duckdb")
    store.register_run(load_run(bf16_run / "run"))
    probe = bf16_run / "probe.jsonl"
    request = JobSpec(run="run", metrics=("heldout_loss", "hessian_trace"), data=str(probe), device="cpu",
                      metric_params={"hessian_trace": {"n_probes": "2"}})  # fmt: skip
    _no_native(monkeypatch)
    first = run_job(store, submit(store, request))
    assert first.computed == 2 and not first.failed
    rows = store.results("run")
    loss = rows[rows["metric"].str.endswith("/heldout_loss")]
    assert len(loss) == 1 and json.loads(loss["params"].iloc[0])["dtype"] == "float32"
    folder = bf16_run / "run" / "step_10"
    in_fp32, in_bf16 = _heldout_nll(folder, probe, FP32), _heldout_nll(folder, probe, BF16)
    assert in_fp32 != in_bf16  # else the check below could not tell the two apart
    assert loss["value"].iloc[0] == pytest.approx(in_fp32, rel=1e-5)
    trace = rows[rows["metric"] == "hessian_trace"]
    assert json.loads(trace["params"].iloc[0])["dtype"] == "float32"

    _native_bf16(monkeypatch)
    second = run_job(store, submit(store, request))
    assert (second.computed, second.cached) == (1, 1)  # the Hessian trace was float32 both times: cached
    rows = label_settings(store.results("run"))
    loss = rows[rows["metric"].str.endswith("/heldout_loss")].set_index("setting")
    assert sorted(loss.index) == ["dtype=bfloat16", "dtype=float32"]
    assert loss.loc["dtype=bfloat16", "value"] == pytest.approx(in_bf16, rel=2e-2)
    assert abs(loss.loc["dtype=bfloat16", "value"] - in_fp32) > abs(loss.loc["dtype=bfloat16", "value"] - in_bf16)


def test_the_metric_command_says_which_dtype_it_ran(bf16_run: Path, monkeypatch) -> None:
    folder, probe = bf16_run / "run" / "step_10", bf16_run / "probe.jsonl"
    _no_native(monkeypatch)
    chosen = compute_once("heldout_loss", folder, probe, device="cpu")
    forced = compute_once("heldout_loss", folder, probe, device="cpu", dtype="bfloat16")
    assert (chosen["dtype"], forced["dtype"]) == ("float32", "bfloat16")
    assert chosen["value"] == pytest.approx(_heldout_nll(folder, probe, FP32), rel=1e-5)
    assert forced["value"] != chosen["value"]
    with pytest.raises(ValueError, match=r"dtype 'half-precision': unknown"):
        compute_once("heldout_loss", folder, probe, device="cpu", dtype="half-precision")
