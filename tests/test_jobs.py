"""The job runner on tiny real checkpoints: lm-eval parity, caching, failures, SIGKILL and resume, import."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from analysis.__main__ import main
from analysis.jobs import JobSpec, run_job, submit
from analysis.jobs.runner import LOADS
from analysis.models import build_word_tokenizer, tiny_moe_config
from analysis.runs.load import load_run
from analysis.store import Store
from tests.conftest import ROOT
from tests.test_evals_lmeval import CURRENT, LEGACY, _write

# Slow: runs lm-eval and metrics on tiny checkpoints (`make test-fast` leaves it out).
pytestmark = pytest.mark.slow

TASKS = ("sequence_ll", "antonyms_mc")
STEPS = (10, 20, 40, 80)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """Four tiny OLMoE checkpoints whose tokenizer covers the bundled language tasks, and a probe file."""
    from transformers import OlmoeForCausalLM

    from analysis.evals.tasks import task_vocabulary

    root = tmp_path_factory.mktemp("jobs") / "tiny"
    words = [str(i) for i in range(20)] + ["+", "="]
    words += [w for w in task_vocabulary() if w not in set(words)]
    tokenizer = build_word_tokenizer(words)
    for i, step in enumerate(STEPS):
        torch.manual_seed(i)
        model = OlmoeForCausalLM(tiny_moe_config(len(tokenizer), hidden_size=32, num_heads=2))
        model.save_pretrained(root / f"step_{step}")
        tokenizer.save_pretrained(root / f"step_{step}")
    probe = root.parent / "probe.jsonl"
    probe.write_text("".join(json.dumps({"text": f"{a} + {a % 7} = {a + a % 7}"}) + "\n" for a in range(12)))
    return root


@pytest.fixture
def store(tmp_path: Path, run_dir: Path) -> Store:
    store = Store(tmp_path / "cache.duckdb")
    store.register_run(load_run(run_dir))
    return store


def spec(run_dir: Path, **kw) -> JobSpec:
    base = {
        "run": "tiny",
        "tasks": TASKS,
        "metrics": ("heldout_loss", "proxy"),
        "data": str(run_dir.parent / "probe.jsonl"),
    }
    return JobSpec(**{**base, **kw})


def test_stored_scores_equal_lm_evals_own_run_and_a_second_eval_loads_nothing(store: Store, run_dir: Path) -> None:
    import lm_eval
    from lm_eval.tasks import TaskManager

    from analysis.evals.tasks import materialize_tasks

    job = submit(store, spec(run_dir, steps=(20, 40)))
    before = LOADS["count"]
    report = run_job(store, job)
    assert LOADS["count"] - before == 2 and not report.failed
    table = store.results("tiny")
    stored = table[table["step"] == 20].set_index("metric")

    include = materialize_tasks(run_dir.parent / "tasks-ref")
    reference = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={run_dir / 'step_20'},dtype=float32",
        tasks=list(TASKS),
        task_manager=TaskManager(include_path=str(include), include_defaults=False),
        batch_size=16,
        device="cpu",
    )["results"]
    for task in TASKS:
        for key, value in reference[task].items():
            if key == "alias" or "_stderr" in key or not isinstance(value, float):
                continue
            assert stored.loc[f"{task}/{key}", "value"] == value, (task, key)
    # The multiple-choice task's continuous counterparts, from the same pass, one per item (acc's items).
    items = store.sample_results("tiny", "antonyms_mc/acc,none")
    items = items[items["step"] == 20]
    p_correct = [
        float(np.exp(ll[int(r["target"])]) / np.exp(ll).sum())
        for r in items["record"].map(json.loads)
        for ll in [np.array(r["loglikelihoods"])]
    ]  # fmt: skip
    assert stored.loc["antonyms_mc/p_correct,none", "value"] == pytest.approx(np.mean(p_correct), rel=1e-9)
    assert stored.loc["antonyms_mc/p_correct,none", "n"] == len(items) > 0
    # Held-out loss: mean token NLL of the probe texts, checked against a direct computation.
    assert stored.loc["probe/heldout_loss", "value"] == pytest.approx(
        _direct_nll(run_dir / "step_20", run_dir), rel=1e-5
    )

    # The same request again: everything is cached, no checkpoint is loaded.
    again = run_job(store, submit(store, spec(run_dir, steps=(20, 40))))
    assert LOADS["count"] - before == 2
    assert again.computed == 0 and again.cached == 2 * len(again_items(run_dir))
    assert len(store.results("tiny")) == len(table)


def again_items(run_dir: Path):
    from analysis.jobs import plan_items

    return plan_items(spec(run_dir))


def _direct_nll(folder: Path, run_dir: Path) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    total, count = 0.0, 0
    for line in (run_dir.parent / "probe.jsonl").read_text().splitlines():
        ids = torch.tensor([tok(json.loads(line)["text"])["input_ids"]])
        with torch.no_grad():
            logits = model(ids).logits[0, :-1].float()
        total += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        count += ids.shape[1] - 1
    return total / count


def test_a_corrupt_checkpoint_fails_its_unit_and_the_job_goes_on(tmp_path: Path, run_dir: Path) -> None:
    copy = shutil.copytree(run_dir, tmp_path / "tiny")
    store = Store(tmp_path / "c.duckdb")
    store.register_run(load_run(copy))
    (copy / "step_20" / "model.safetensors").write_bytes(b"\x00" * 64)  # corrupted after registration
    job = submit(store, JobSpec(run="tiny", tasks=("sequence_ll",), steps=(10, 20, 40)))
    report = run_job(store, job)
    units = store.job_units(job).set_index("unit")
    assert units.loc["20", "status"] == "failed" and "cannot load checkpoint" in units.loc["20", "message"]
    assert units.loc["10", "status"] == units.loc["40", "status"] == "done"
    assert sorted(store.results("tiny")["step"].unique()) == [10, 40]
    assert len(report.failed) == 1


def test_the_same_probe_data_at_another_path_is_a_cache_hit_and_edited_data_is_not(
    tmp_path: Path, store: Store, run_dir: Path
) -> None:
    """The probe set is keyed by its name and content, not its path: caches move between checkouts."""
    metrics = ("heldout_loss", "memorisation", "hessian_trace")
    params = {"hessian_trace": {"n_probes": "1"}}
    job = submit(
        store,
        JobSpec(
            run="tiny", steps=(10,), metrics=metrics, data=str(run_dir.parent / "probe.jsonl"), metric_params=params
        ),
    )
    assert not run_job(store, job).failed
    rows = len(store.results("tiny"))
    assert rows > 0 and all(json.loads(p)["data"] == "probe.jsonl" for p in store.results("tiny")["params"])

    moved = tmp_path / "elsewhere" / "probe.jsonl"
    moved.parent.mkdir()
    shutil.copy(run_dir.parent / "probe.jsonl", moved)
    before = LOADS["count"]
    run_job(
        store, submit(store, JobSpec(run="tiny", steps=(10,), metrics=metrics, data=str(moved), metric_params=params))
    )
    assert LOADS["count"] == before and len(store.results("tiny")) == rows  # nothing loaded, nothing new

    moved.write_text(moved.read_text().replace("+", "-", 1))  # same path, different content
    run_job(
        store, submit(store, JobSpec(run="tiny", steps=(10,), metrics=metrics, data=str(moved), metric_params=params))
    )
    assert LOADS["count"] == before + 1 and len(store.results("tiny")) == 2 * rows


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"tasks": ("antonym_mc",)}, "did you mean 'antonyms_mc'"),
        ({"metrics": ("hesian_trace",)}, "did you mean 'hessian_trace'"),
        ({"steps": (11,)}, "no checkpoint at step 11"),
        ({"metrics": ("heldout_loss",), "data": "/nonexistent/probe.jsonl"}, "no such file"),
    ],
)
def test_bad_requests_queue_nothing(store: Store, run_dir: Path, kw: dict, message: str) -> None:
    with pytest.raises((ValueError, KeyError), match=message):
        submit(store, spec(run_dir, **kw))
    assert store.jobs().empty


def test_sigkill_mid_job_leaves_whole_units_and_resume_finishes(store: Store, run_dir: Path) -> None:
    job = submit(store, spec(run_dir, tasks=TASKS, metrics=("heldout_loss", "proxy")))
    worker = subprocess.Popen(
        [sys.executable, "-m", "analysis", "worker", "--once", "--poll", "0.2", "--db", str(store.path)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 180
    try:
        while time.monotonic() < deadline:
            units = store.job_units(job)
            if (units["status"] == "done").sum() >= 1:
                break
            assert worker.poll() is None, "worker exited before finishing a unit"
            time.sleep(0.05)
        os.kill(worker.pid, signal.SIGKILL)
    finally:
        worker.wait(timeout=30)
    units = store.job_units(job).set_index("unit")
    done_steps = {int(u) for u in units.index[units["status"] == "done"]}
    assert 1 <= len(done_steps) < len(STEPS), "kill landed after the job ended; slow the units down"
    per_step = store.results("tiny").groupby("step")["metric"].nunique().to_dict()
    # Whole units only: every finished step has all its metrics, no other step has any.
    assert set(per_step) == done_steps
    assert len(set(per_step.values())) == 1

    before = LOADS["count"]
    from analysis.jobs import next_job

    assert next_job(store) == job  # a running job whose worker is dead is picked up again
    report = run_job(store, job)
    assert LOADS["count"] - before == len(STEPS) - len(done_steps)
    assert not report.failed
    assert set(store.results("tiny")["step"]) == set(STEPS)
    assert store.jobs().set_index("id").loc[job, "status"] == "done"


def test_import_evals_reads_both_schemas(tmp_path: Path, store: Store) -> None:
    current = _write(tmp_path / "olmo" / "results.json", CURRENT)
    legacy = _write(tmp_path / "pythia" / "results.json", LEGACY)
    assert main(["import-evals", str(current), "--run", "tiny", "--db", str(store.path)]) == 0
    assert main(["import-evals", str(legacy), "--run", "tiny", "--db", str(store.path)]) == 0
    table = store.results("tiny").set_index(["step", "metric"])
    assert table.loc[(20000, "arc_easy/acc,none"), "value"] == 0.5606
    assert table.loc[(20000, "arc_easy/acc,none"), "stderr"] == 0.0102
    assert pd_isna(table.loc[(20000, "lambada_openai/acc,none"), "stderr"])  # "N/A"
    assert table.loc[(83000, "piqa/acc_norm,none"), "value"] == 0.7176
    assert (83000, "winogrande/acc,none") not in table.index  # non-numeric value skipped
    # Importing the same file twice adds nothing.
    n = len(table)
    assert main(["import-evals", str(legacy), "--run", "tiny", "--db", str(store.path)]) == 0
    assert len(store.results("tiny")) == n


def pd_isna(x) -> bool:
    import pandas as pd

    return bool(pd.isna(x))


def test_import_evals_bad_file_is_one_line(tmp_path: Path, store: Store, capsys) -> None:
    bad = tmp_path / "results.json"
    bad.write_text("{not json")
    assert main(["import-evals", str(bad), "--run", "tiny", "--db", str(store.path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(bad) in err and err.count("\n") == 1
    assert store.results("tiny").empty


def test_metric_command_prints_json_without_touching_the_cache(run_dir: Path, tmp_path: Path, capsys) -> None:
    db = tmp_path / "untouched.duckdb"
    probe = str(run_dir.parent / "probe.jsonl")
    code = main(["metric", "heldout_loss", "--checkpoint", str(run_dir / "step_20"), "--data", probe, "--db", str(db)])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["value"] == pytest.approx(_direct_nll(run_dir / "step_20", run_dir), rel=1e-5)
    assert out["stderr"] > 0
    assert not db.exists()


def _user_task(folder: Path, name: str = "my_antonyms") -> Path:
    """The bundled antonyms task as a user's YAML in ``folder``, its data copied beside it (absolute paths)."""
    import yaml

    from analysis.evals.tasks import DEFAULT_DATA_DIR

    folder.mkdir(parents=True, exist_ok=True)
    cfg = yaml.safe_load((DEFAULT_DATA_DIR / "antonyms" / "antonyms_mc.yaml").read_text())
    files = {}
    for split in ("train", "test"):
        files[split] = str(shutil.copy(DEFAULT_DATA_DIR / "antonyms" / f"{split}.jsonl", folder / f"{split}.jsonl"))
    cfg["task"] = name
    cfg["dataset_kwargs"] = {"data_files": files, "cache_dir": str(folder / ".hf_datasets")}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def test_a_task_yaml_beside_the_cache_and_logs_is_computed_once_until_its_data_changes(
    tmp_path: Path, store: Store, run_dir: Path
) -> None:
    task = _user_task(tmp_path)  # the same folder as store.path: the DuckDB file changes with every write
    assert store.path.parent == task.parent
    request = spec(run_dir, tasks=(str(task),), metrics=(), steps=(10,), limit=4)
    first = run_job(store, submit(store, request))
    assert (first.computed, first.cached) == (1, 0) and not first.failed
    rows = len(store.results("tiny"))

    (tmp_path / "eval.log").write_text(first.summary() + "\n")
    again = run_job(store, submit(store, request))
    assert (again.computed, again.cached) == (0, 1)
    assert len(store.results("tiny")) == rows  # no second copy under another parameter hash

    test_split = tmp_path / "test.jsonl"
    lines = test_split.read_text().splitlines()
    test_split.write_text("\n".join([lines[1], lines[0], *lines[2:]]) + "\n")  # same records, new order
    edited = run_job(store, submit(store, request))
    assert (edited.computed, edited.cached) == (1, 0)


def test_task_digest_follows_includes_and_ignores_unrelated_files(tmp_path: Path) -> None:
    from analysis.jobs.task_digest import yaml_task_digest

    task = _user_task(tmp_path / "t")
    base = tmp_path / "shared" / "base.yaml"
    base.parent.mkdir()
    base.write_text("output_type: multiple_choice\ninclude: ../t/my_antonyms.yaml\n")  # a cycle back
    task.write_text(task.read_text() + "include: ../shared/base.yaml\n")
    before = yaml_task_digest(task)
    assert yaml_task_digest(task) == before
    (task.parent / "cache.duckdb").write_bytes(os.urandom(64))
    (task.parent / "run.log").write_text("step 1\n")
    assert yaml_task_digest(task) == before
    base.write_text(base.read_text().replace("multiple_choice", "loglikelihood"))
    assert yaml_task_digest(task) != before


def test_relative_data_files_resolve_against_the_working_directory(tmp_path: Path, monkeypatch) -> None:
    from analysis.jobs.task_digest import yaml_task_digest

    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    (work / "data" / "test.jsonl").write_text('{"q": "a", "a": "b"}\n')
    task = tmp_path / "tasks" / "rel.yaml"
    task.parent.mkdir()
    (task.parent / "data").mkdir()
    (task.parent / "data" / "test.jsonl").write_text('{"q": "decoy", "a": "b"}\n')  # beside the YAML
    task.write_text("task: rel\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: data/test.jsonl\n")
    monkeypatch.chdir(work)
    before = yaml_task_digest(task)
    (task.parent / "data" / "test.jsonl").write_text('{"q": "decoy 2", "a": "b"}\n')
    assert yaml_task_digest(task) == before  # lm-eval never reads the copy beside the YAML
    (work / "data" / "test.jsonl").write_text('{"q": "c", "a": "d"}\n')
    assert yaml_task_digest(task) != before


@pytest.mark.parametrize("data_files", ["missing.jsonl", "[missing.jsonl]", "{test: [missing.jsonl]}"])
def test_a_missing_data_file_is_a_one_line_error(tmp_path: Path, monkeypatch, data_files: str) -> None:
    from analysis.jobs.task_digest import yaml_task_digest

    monkeypatch.chdir(tmp_path)
    task = tmp_path / "gone.yaml"
    task.write_text(f"task: gone\ndataset_path: json\ndataset_kwargs:\n  data_files: {data_files}\n")
    with pytest.raises(ValueError, match=r"gone\.yaml: data file .*missing\.jsonl not found") as err:
        yaml_task_digest(task)
    assert "\n" not in str(err.value)


def test_builtin_tasks_are_digested_by_name_and_lm_eval_version(monkeypatch) -> None:
    import importlib.metadata

    from analysis.jobs.spec import _task_digest

    arc = _task_digest("arc_easy")
    assert arc == _task_digest("arc_easy") and arc != _task_digest("piqa")
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "9.9.9")
    assert _task_digest("arc_easy") != arc


def test_task_digest_covers_the_python_helpers_its_function_tags_name(tmp_path: Path) -> None:
    from analysis.jobs.task_digest import yaml_task_digest

    task = _user_task(tmp_path)
    task.write_text(task.read_text() + "process_docs: !function utils.process_docs\n")
    helper = tmp_path / "utils.py"
    helper.write_text("def process_docs(docs):\n    return docs\n")
    before = yaml_task_digest(task)
    helper.write_text("def process_docs(docs):\n    return docs.select(range(2))\n")
    assert yaml_task_digest(task) != before
