"""The metric command and the job runner on tiny real checkpoints: token-id probes without a
tokenizer, padding, failing forward passes, per-metric seeds and progress of long metrics."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from analysis.jobs import JobSpec, run_job, submit
from analysis.jobs.metric_once import compute_once
from analysis.models import load_model, pad_token_id, tiny_moe_config
from analysis.runs.load import load_run
from analysis.store import Store
from tests.conftest import ROOT
from tests.factories import save_tiny_checkpoint, tiny_tokenizer
from tests.test_cli import cli

# Sums of different lengths, so batches are padded.
TEXTS = ["3 + 4 = 7", "1 + 1 = 2", "12 + 5 = 17", "2 = 2", "10 + 3 + 4 = 17", "6 + 6 = 12", "0 + 9 = 9", "19"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """A tiny OLMoE with its tokenizer, the same weights without tokenizer files, and probe files."""
    root = tmp_path_factory.mktemp("metric command")
    with_tok = save_tiny_checkpoint(root / "run" / "step_10")
    raw = Path(shutil.copytree(with_tok, root / "raw" / "step_10"))
    for file in raw.iterdir():
        if file.name.startswith(("tokenizer", "special_tokens")):
            file.unlink()
    tokenizer = tiny_tokenizer()
    ids = root / "ids.jsonl"
    ids.write_text("".join(json.dumps({"input_ids": tokenizer(t)["input_ids"]}) + "\n" for t in TEXTS))
    text = root / "text.jsonl"
    text.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return {"with_tok": with_tok, "raw": raw, "ids": ids, "text": text, "root": root}


def _metric(name: str, checkpoint: Path, data: Path, *params: str) -> dict:
    extra = [arg for p in params for arg in ("--param", p)]
    code, out, err = cli(
        "metric", name, "--checkpoint", str(checkpoint), "--data", str(data), "--device", "cpu", *extra
    )
    assert code == 0, err
    return json.loads(out)


# --- 1. input_ids probes need no tokenizer -----------------------------------------------------------


def test_the_raw_checkpoint_really_has_no_tokenizer(folders) -> None:
    assert not [p for p in folders["raw"].iterdir() if p.name.startswith("tokenizer")]
    with pytest.raises(ValueError, match="no tokenizer files"):
        load_model(folders["raw"], device="cpu")  # eager loading still refuses


@pytest.mark.parametrize(("name", "params"), [("heldout_loss", ()), ("hessian_trace", ("n_probes=2",))])
@pytest.mark.slow
def test_input_ids_probes_give_the_same_value_without_tokenizer_files(folders, name, params) -> None:
    with_tok = _metric(name, folders["with_tok"], folders["ids"], *params)
    raw = _metric(name, folders["raw"], folders["ids"], *params)
    assert raw["value"] == with_tok["value"]
    assert raw["stderr"] == with_tok["stderr"]
    assert raw["value"] != 0.0


@pytest.mark.slow
def test_bits_per_byte_of_token_ids_is_unavailable_and_says_why(folders) -> None:
    raw = _metric("heldout_loss", folders["raw"], folders["ids"])["domains"]["ids"]
    assert raw["bits_per_byte"] is None
    assert "input_ids" in raw["bits_per_byte_note"] and "no tokenizer files" in raw["bits_per_byte_note"]
    with_tok = _metric("heldout_loss", folders["with_tok"], folders["ids"])["domains"]["ids"]
    assert "no tokenizer files" not in with_tok["bits_per_byte_note"]
    text = _metric("heldout_loss", folders["with_tok"], folders["text"])["domains"]["text"]
    assert text["bits_per_byte"] > 0 and "bits_per_byte_note" not in text


def test_a_text_probe_on_a_checkpoint_without_tokenizer_is_one_line(folders) -> None:
    code, out, err = cli("metric", "heldout_loss", "--checkpoint", str(folders["raw"]), "--data", str(folders["text"]))
    assert code == 2 and not out
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "no tokenizer files" in err and str(folders["raw"]) in err and "text.jsonl" in err


@pytest.mark.slow
def test_padding_is_ignored_and_the_pad_id_comes_from_the_config(folders) -> None:
    from analysis.evals.heldout import heldout_loss, load_probe_set
    from analysis.jobs.kinds import probe_batches
    from analysis.metrics.common import lm_loss

    model, lazy = load_model(folders["raw"], device="cpu", lazy_tokenizer=True)
    model.config.pad_token_id = None
    model.config.eos_token_id = [2, 5]
    assert pad_token_id(model) == 2  # no pad id: the first EOS id
    probe = load_probe_set(folders["ids"], lazy, max_length=32)
    assert lazy.loaded is None  # token ids loaded no tokenizer
    seqs = probe.domains["ids"]
    assert len({len(s) for s in seqs}) > 2  # lengths differ: batches are padded
    batched = heldout_loss(model, probe, batch_size=8)["ids"]
    with torch.no_grad():
        alone = []
        for seq in seqs:
            ids = torch.tensor([seq])
            logits = model(input_ids=ids).logits[0, :-1].float()
            alone.append(float(F.cross_entropy(logits, ids[0, 1:])))
    assert batched.per_sample_nll == pytest.approx(alone, rel=1e-5)
    # The flatness metrics' loss on the padded probe batch is the token-weighted mean of the same.
    spec = JobSpec(run="-", metrics=("hessian_trace",), batch_size=8, metric_batches=1)
    (batch,) = probe_batches(probe, spec, pad_token_id(model))
    assert int((batch["input_ids"] == 2).sum()) > int((batch["attention_mask"] == 0).sum()) - 1  # padded with 2
    with torch.no_grad():
        loss, count = lm_loss(model, batch)
    weights = [len(s) - 1 for s in seqs]
    assert count == sum(weights)
    assert float(loss) == pytest.approx(
        sum(a * w for a, w in zip(alone, weights, strict=True)) / sum(weights), rel=1e-5
    )
    model.config.eos_token_id = None
    assert pad_token_id(model) == 0


# --- 2. a failing forward pass ends in one line -------------------------------------------------------------


@pytest.fixture(scope="module")
def broken_forward(tmp_path_factory) -> Path:
    """A real checkpoint whose config.json has hidden_size 30 for 4 heads: it loads, its forward fails."""
    from transformers import OlmoeForCausalLM

    folder = tmp_path_factory.mktemp("broken") / "step_5"
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    OlmoeForCausalLM(tiny_moe_config(len(tokenizer), hidden_size=30, num_heads=4)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["hidden_size"] % 4 != 0
    return folder


@pytest.mark.slow
def test_a_forward_pass_that_fails_is_one_line_and_exit_2(folders, broken_forward) -> None:
    argv = ["metric", "hessian_trace", "--checkpoint", str(broken_forward), "--data", str(folders["ids"])]
    done = subprocess.run(
        [sys.executable, "-m", "analysis", *argv], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1, done.stderr  # exactly one line: no traceback, no loading bars
    line = done.stderr
    assert line.startswith("error: metric hessian_trace failed")
    assert str(broken_forward) in line and "RuntimeError" in line and "config.json" in line
    assert "Traceback" not in line and not done.stdout


def test_debug_prints_the_traceback_before_the_line(folders, broken_forward) -> None:
    argv = ["metric", "hessian_trace", "--checkpoint", str(broken_forward), "--data", str(folders["ids"])]
    code, _, err = cli(*argv, "--debug")
    assert code == 2
    lines = err.strip().splitlines()
    assert lines[0] == "Traceback (most recent call last):" and len(lines) > 10
    assert lines[-1].startswith("error: metric hessian_trace failed")
    assert any(line.startswith("RuntimeError: ") for line in lines[:-1])


def test_debug_is_accepted_by_every_command() -> None:
    from analysis.__main__ import build_parser

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # the parser's own list of commands
    for name, sub in commands.items():
        assert any("--debug" in action.option_strings for action in sub._actions), name


def test_a_config_that_does_not_fit_the_weights_names_the_tensor(folders, tmp_path) -> None:
    bad = Path(shutil.copytree(folders["with_tok"], tmp_path / "step_10"))
    config = json.loads((bad / "config.json").read_text())
    config["num_attention_heads"] = config["num_key_value_heads"] = 3  # the weights were saved with 4
    (bad / "config.json").write_text(json.dumps(config))
    code, _, err = cli("metric", "heldout_loss", "--checkpoint", str(bad), "--data", str(folders["ids"]))
    assert code == 2 and err.count("\n") == 1, err
    assert str(bad) in err and "config.json does not fit the weights" in err and "self_attn" in err


# --- 3. a seed per metric -------------------------------------------------------------------------------


@pytest.mark.slow
def test_seed_is_a_parameter_of_every_metric_and_changes_the_probes(folders) -> None:
    one = compute_once("hessian_trace", folders["raw"], folders["ids"], params=["n_probes=3", "seed=1"], device="cpu")
    two = compute_once("hessian_trace", folders["raw"], folders["ids"], params=["n_probes=3", "seed=2"], device="cpu")
    assert one["params"]["seed"] == 1 and two["params"]["seed"] == 2
    assert one["per_probe"] != two["per_probe"] and one["value"] != two["value"]
    same = compute_once("hessian_trace", folders["raw"], folders["ids"], params=["n_probes=3"], device="cpu", seed=1)
    assert same["value"] == one["value"]  # the parameter and the command's --seed mean the same


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (["sed=1"], "unknown parameter 'sed' for metric 'hessian_trace'; did you mean 'seed'?"),
        (["n_probe=2"], "did you mean 'n_probes'?"),
        (["seed=-1"], "parameter 'seed': must be >= 0"),
        (["seed=one"], "parameter 'seed': expected an integer"),
    ],
)
def test_bad_metric_parameters_are_one_line(folders, params, message) -> None:
    extra = [arg for p in params for arg in ("--param", p)]
    code, _, err = cli(
        "metric", "hessian_trace", "--checkpoint", str(folders["raw"]), "--data", str(folders["ids"]), *extra
    )
    assert code == 2 and err.count("\n") == 1 and message in err, err


def test_heldout_loss_refuses_parameters_it_does_not_have(folders) -> None:
    code, _, err = cli(
        "metric",
        "heldout_loss",
        "--checkpoint",
        str(folders["raw"]),
        "--data",
        str(folders["ids"]),
        "--param",
        "n_probes=2",
    )
    assert code == 2 and "heldout_loss takes no parameters" in err


@pytest.mark.slow
def test_a_metric_seed_overrides_the_job_seed_and_is_cached_as_its_own_setting(folders, tmp_path) -> None:
    store = Store(tmp_path / "cache.duckdb")
    store.register_run(load_run(folders["raw"].parent))  # the run without tokenizer files
    base = {"run": "raw", "metrics": ("hessian_trace",), "data": str(folders["ids"]), "batch_size": 4, "seed": 7}
    for seed in ("1", "2"):
        params = {"hessian_trace": {"n_probes": "2", "seed": seed}}
        report = run_job(store, submit(store, JobSpec(**base, metric_params=params)))
        assert report.computed == 1 and not report.failed, report.failed
    again = run_job(
        store, submit(store, JobSpec(**base, metric_params={"hessian_trace": {"n_probes": "2", "seed": "1"}}))
    )
    assert again.cached == 1 and again.computed == 0
    table = store.long_table(["raw"])
    rows = table[table["metric"] == "hessian_trace"]
    assert len(rows) == 2 and rows["params_hash"].nunique() == 2
    assert rows["value"].nunique() == 2
    seeds = sorted(json.loads(p)["seed"] if isinstance(p, str) else p["seed"] for p in rows["params"])
    assert seeds == [1, 2]  # the metric's own seed, not the job's 7


# --- 4. progress of long metrics --------------------------------------------------------------------------


def _batches(folders) -> tuple:
    from analysis.evals.heldout import load_probe_set
    from analysis.jobs.kinds import probe_batches

    model, lazy = load_model(folders["raw"], device="cpu", lazy_tokenizer=True)
    probe = load_probe_set(folders["ids"], lazy, max_length=32)
    spec = JobSpec(run="-", metrics=("hessian_trace",), batch_size=4, metric_batches=2)
    return model, probe_batches(probe, spec, pad_token_id(model))


@pytest.mark.parametrize(
    ("name", "config", "expected"),
    [
        ("hessian_trace", {"n_probes": 3}, 6),  # 2 batches x 3 probes
        ("fisher_trace", {"n_samples": 2}, 4),
        ("adaptive_sharpness", {"n_samples": 2}, 4),
        ("perturbation_sensitivity", {"n_samples": 2}, 4),
        ("gradient_alignment", {"n_splits": 2}, 4),  # one domain: two halves per split
        ("hessian_top_eigenvalue", {"max_iter": 3, "tol": 1e-12}, 3),  # cannot converge in 3: every iteration
    ],
)
@pytest.mark.slow
def test_long_metrics_report_each_step_and_give_the_same_value(folders, name, config, expected) -> None:
    from analysis.metrics.registry import compute, progress_unit

    model, batches = _batches(folders)
    calls: list[tuple[int, int]] = []
    seen = compute(name, model, batches, dict(config), device="cpu", seed=3, progress=lambda i, n: calls.append((i, n)))
    assert calls == [(i, expected) for i in range(1, expected + 1)]
    quiet = compute(name, model, batches, dict(config), device="cpu", seed=3)
    assert seen.value == quiet.value  # reporting changes nothing
    assert progress_unit(name) != "step"


@pytest.mark.slow
def test_the_metric_command_prints_progress_lines_when_stderr_is_not_a_terminal(folders) -> None:
    args = ("metric", "hessian_trace", "--checkpoint", str(folders["raw"]), "--data", str(folders["ids"]))
    code, out, err = cli(*args, "--param", "n_probes=3")
    assert code == 0, err
    assert err.splitlines() == [f"hessian_trace: probe {i}/3" for i in range(1, 4)]  # 8 samples: one batch
    assert json.loads(out)["n"] == 3


@pytest.mark.slow
def test_a_jobs_unit_reports_progress_inside_a_long_metric(folders, tmp_path, monkeypatch) -> None:
    from analysis.jobs import runner

    store = Store(tmp_path / "cache.duckdb")
    store.register_run(load_run(folders["raw"].parent))
    monkeypatch.setattr(runner, "NOTE_EVERY", 0.0)
    notes: list[str] = []
    original = store.set_unit
    monkeypatch.setattr(store, "set_unit", lambda u: (notes.append(u.message), original(u))[1])
    seen: list[str] = []
    spec = JobSpec(
        run="raw", metrics=("hessian_trace",), data=str(folders["ids"]), batch_size=4,
        metric_params={"hessian_trace": {"n_probes": "2"}},
    )  # fmt: skip
    run_job(store, submit(store, spec), progress=lambda *a: seen.append(a[5]))
    assert [w for w in seen if "probe" in w] == [f"hessian_trace probe {i}/4" for i in range(1, 5)]
    assert "hessian_trace probe 4/4" in notes  # what the Jobs page shows for a running unit
    units = store.job_units(int(store.jobs()["id"].iloc[0]))
    assert list(units["status"]) == ["done"]  # the final write replaces the note


def test_the_jobs_page_shows_where_a_running_unit_is(populated_db: Path, monkeypatch) -> None:
    from analysis.store import UnitUpdate
    from tests.test_app import open_app

    store = Store(populated_db)
    job = store.create_job("alpha", {"run": "alpha", "metrics": ["hessian_trace"]}, [("10", 1), ("30", 1)])
    store.set_job(job, "running")
    store.set_unit(UnitUpdate(job, "10", "running", 0, 1, "hessian_trace probe 12/32"))
    at = open_app(populated_db, monkeypatch)
    at.switch_page("pages/jobs.py").run()
    assert not at.exception
    # Markdown source: the underscore is escaped so that it shows as typed.
    assert [c.value for c in at.caption if "probe" in c.value] == ["step 10: hessian\\_trace probe 12/32"]
