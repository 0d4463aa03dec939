"""The fine-tune probe on tiny real checkpoints: it learns, forgetting is what it says, caching, kill, bad inputs."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from analysis.__main__ import main
from analysis.jobs import JobSpec, run_job, submit
from analysis.jobs.runner import LOADS
from analysis.runs.load import load_run
from analysis.store import Store
from tests.conftest import ROOT
from tests.factories import save_tiny_checkpoint

# Slow: fine-tunes tiny checkpoints and runs lm-eval on them (`make test-fast` leaves it out).
pytestmark = pytest.mark.slow

STEPS = (10, 20)
# Full fine-tuning, few steps: the tiny model learns the copy task in about a second.
FAST = ("method=full", "lr=3e-3", "steps=40", "warmup_steps=2", "limit=40")


def _task(folder: Path, answer) -> Path:
    """A prompt/answer task over the tiny vocabulary: "a + b =" -> answer(a, b); test pairs never trained on."""
    pairs = [(a, b) for a in range(20) for b in range(20)]
    random.Random(0).shuffle(pairs)
    folder.mkdir(parents=True, exist_ok=True)
    for name, chunk in (("test", pairs[:40]), ("train", pairs[40:])):
        lines = (json.dumps({"prompt": f"{a} + {b} =", "answer": str(answer(a, b))}) for a, b in chunk)
        (folder / f"{name}.jsonl").write_text("".join(line + "\n" for line in lines))
    return folder


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """Two tiny OLMoE checkpoints, a copy task ("a + b =" -> a), a second task (-> b) and a probe file."""
    root = tmp_path_factory.mktemp("finetune")
    for i, step in enumerate(STEPS):
        save_tiny_checkpoint(root / "tiny" / f"step_{step}", seed=i)
    _task(root / "copy", lambda a, b: a)
    _task(root / "second", lambda a, b: b)
    (root / "probe.jsonl").write_text(
        "".join(json.dumps({"text": f"{a} + {a % 7} = {a % 13}"}) + "\n" for a in range(12))
    )
    return root


@pytest.fixture
def store(tmp_path: Path, root: Path) -> Store:
    store = Store(tmp_path / "cache.duckdb")
    store.register_run(load_run(root / "tiny"))
    return store


def _eval_args(store: Store, root: Path, *params: str, steps: str = "10") -> list[str]:
    args = ["eval", "--run", "tiny", "--steps", steps, "--metrics", "finetune", "--data", str(root / "probe.jsonl")]
    args += ["--db", str(store.path), "--param", f"finetune.task={root / 'copy'}"]
    for p in params:
        args += ["--param", f"finetune.{p}"]
    return args


def _values(store: Store) -> dict[str, float]:
    table = store.results("tiny")
    return dict(zip(table["metric"], table["value"], strict=True))


def test_fine_tuning_raises_the_score_forgetting_matches_the_kept_copy_and_a_second_request_computes_nothing(
    store: Store, root: Path, tmp_path: Path
) -> None:
    from analysis.evals.heldout import heldout_loss, load_probe_set
    from analysis.evals.lmeval import run_lm_eval
    from analysis.finetune.data import eval_spec
    from analysis.models import load_model

    keep = tmp_path / "kept"
    args = [*_eval_args(store, root, *FAST, f"other_tasks={root / 'second'}"), "--keep", str(keep)]
    assert main(args) == 0
    values = _values(store)
    # Untuned, a random model almost never copies the first operand; fine-tuned on other pairs it does.
    assert values["finetune/copy/pre"] < 0.2
    assert values["finetune/copy/post"] > values["finetune/copy/pre"] + 0.5
    assert values["finetune/copy/gain"] == pytest.approx(values["finetune/copy/post"] - values["finetune/copy/pre"])

    # Forgetting, computed again from the saved fine-tuned copy and the untouched checkpoint.
    kept = list((keep / "tiny" / "step_10").iterdir())
    assert len(kept) == 1 and (kept[0] / "model.safetensors").is_file()
    assert not any(p.name.startswith(".") for p in (keep / "tiny" / "step_10").iterdir())  # no temporary left
    assert sorted(p.name for p in (root / "tiny").iterdir()) == ["step_10", "step_20"]  # nothing next to them
    tuned, tok = load_model(kept[0], device="cpu")
    base, _ = load_model(root / "tiny" / "step_10", device="cpu")
    probe = load_probe_set(root / "probe.jsonl", tok, 64, max_samples=256)
    after = heldout_loss(tuned, probe)["probe"].mean_nll
    before = heldout_loss(base, probe)["probe"].mean_nll
    assert values["finetune/copy/forgetting_probe"] == pytest.approx(after - before, abs=1e-5)
    assert abs(after - before) > 1e-3  # fine-tuning moved the held-out loss at all

    def acc(model, task: str) -> float:
        out = run_lm_eval(model, tok, [eval_spec(str(root / task))], limit=40, bootstrap_iters=0)
        return next(r.value for r in out.rows if r.metric == "acc,none")

    assert values["finetune/copy/change:second/acc,none"] == pytest.approx(acc(tuned, "second") - acc(base, "second"))
    assert values["finetune/copy/post"] == pytest.approx(acc(tuned, "copy"))

    before_loads, rows = LOADS["count"], len(store.results("tiny"))
    assert main(_eval_args(store, root, *FAST, f"other_tasks={root / 'second'}")) == 0  # --keep is no cache key
    assert LOADS["count"] == before_loads and len(store.results("tiny")) == rows


def test_every_setting_is_in_the_cache_key_and_progress_is_reported(store: Store, root: Path) -> None:
    from analysis.jobs.spec import plan_items

    def params(**kw):
        given = {"task": str(root / "copy"), **kw}
        return plan_items(JobSpec(run="tiny", metrics=("finetune",), metric_params={"finetune": given}))[0].params_hash

    base = params()
    for key, value in [("method", "full"), ("steps", "5"), ("lr", "0.1"), ("schedule", "linear"), ("batch_size", "4"),
                       ("seed", "1"), ("seeds", "2"), ("target_modules", "q_proj"), ("lora_r", "4")]:  # fmt: skip
        assert params(**{key: value}) != base, key
    assert params(keep="/tmp/x") == base

    seen: list[str] = []
    job = submit(store, JobSpec(run="tiny", steps=(20,), metrics=("finetune",), data=str(root / "probe.jsonl"),
                                metric_params={"finetune": {"task": str(root / "copy"), "steps": "6"}}))  # fmt: skip
    report = run_job(store, job, progress=lambda *a: seen.append(a[-1]))
    assert not report.failed and report.computed == 1
    assert any(s.startswith("finetune:copy step ") for s in seen) and "finetune:copy step 6/6" in seen


def test_a_killed_fine_tune_leaves_no_rows(store: Store, root: Path) -> None:
    given = {"task": str(root / "copy"), "steps": "100000", "method": "full", "lr": "1e-4"}
    job = submit(store, JobSpec(run="tiny", steps=(10,), metrics=("finetune",), data=str(root / "probe.jsonl"),
                                metric_params={"finetune": given}))  # fmt: skip
    worker = subprocess.Popen(
        [sys.executable, "-m", "analysis", "worker", "--once", "--poll", "0.2", "--db", str(store.path)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            message = str(store.job_units(job)["message"].iloc[0])
            if "finetune:copy step" in message:
                break
            assert worker.poll() is None, "worker exited before fine-tuning"
            time.sleep(0.2)
        else:
            pytest.fail("the fine-tune never reported a step")
        os.kill(worker.pid, signal.SIGKILL)
    finally:
        worker.wait(timeout=30)
    assert store.results("tiny").empty
    assert store.job_units(job)["status"].iloc[0] == "running"


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (("target_modules=nonexistent_proj",), "LoRA target modules 'nonexistent_proj' match no module"),
        (("method=full", "lr=1e30", "grad_clip=0", "steps=20"), "fine-tuning diverged"),
    ],
)
def test_bad_fine_tunes_fail_the_unit_in_one_line_and_store_nothing(
    store: Store, root: Path, capsys, params: tuple[str, ...], message: str
) -> None:
    assert main(_eval_args(store, root, *params)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    failed = [line for line in err if line.startswith("failed:")]
    assert len(failed) == 1 and message in failed[0], err
    assert store.results("tiny").empty
    units = store.job_units(int(store.jobs()["id"].iloc[0]))
    assert list(units["status"]) == ["failed"] and message in units["message"].iloc[0]


def test_a_task_without_a_train_split_is_refused_in_one_line(store: Store, root: Path, tmp_path: Path, capsys) -> None:
    # A prompt/answer folder without train.jsonl: refused before anything is queued.
    folder = tmp_path / "notrain"
    folder.mkdir()
    (folder / "test.jsonl").write_text((root / "copy" / "test.jsonl").read_text())
    assert main([*_eval_args(store, root), "--param", f"finetune.task={folder}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no train.jsonl" in err and str(folder) in err
    assert store.jobs().empty
    # An lm-eval task YAML without a training split: the unit fails with one line, nothing is stored.
    yaml_path = tmp_path / "notrain.yaml"
    test_file = root / "copy" / "test.jsonl"
    yaml_path.write_text(
        "task: notrain_ll\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {test_file}\noutput_type: loglikelihood\ntest_split: test\n"
        'doc_to_text: "{{prompt}}"\ndoc_to_target: " {{answer}}"\ntarget_delimiter: ""\n'
        "metric_list:\n  - metric: acc\n"
    )
    assert main([*_eval_args(store, root), "--param", f"finetune.task={yaml_path}"]) == 1
    failed = [line for line in capsys.readouterr().err.splitlines() if line.startswith("failed:")]
    assert len(failed) == 1 and "has no training split" in failed[0]
    assert store.results("tiny").empty


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({}, "finetune needs a task"),
        ({"task": "x", "stepz": "3"}, "did you mean 'steps'"),
        ({"task": "x", "method": "qlora"}, "method='qlora': use lora or full"),
        ({"task": "x", "lr": "fast"}, "not a number"),
    ],
)
def test_bad_settings_are_refused_before_queueing(store: Store, given: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        submit(store, JobSpec(run="tiny", metrics=("finetune",), metric_params={"finetune": given}))
    assert store.jobs().empty


def test_keep_inside_the_run_folder_is_refused(store: Store, root: Path, capsys) -> None:
    assert main([*_eval_args(store, root, "steps=2"), "--keep", str(root / "tiny" / "ft")]) == 1
    failed = [line for line in capsys.readouterr().err.splitlines() if line.startswith("failed:")]
    assert len(failed) == 1 and "inside the run folder" in failed[0]
    assert not (root / "tiny" / "ft").exists() and store.results("tiny").empty


def test_ray_executor_stores_what_the_local_executor_stores(tmp_path: Path, root: Path) -> None:
    pytest.importorskip("ray")
    from analysis.jobs.ray_executor import metric_groups, run_job_ray
    from analysis.jobs.spec import plan_items

    given = {"task": str(root / "copy"), "steps": "4"}
    spec = JobSpec(run="tiny", steps=(20,), metrics=("finetune", "heldout_loss"),
                   data=str(root / "probe.jsonl"), metric_params={"finetune": given})  # fmt: skip
    assert len(metric_groups(plan_items(spec))) == 2  # the fine-tune is a Ray task of its own
    stores = []
    for name in ("local", "ray"):
        store = Store(tmp_path / f"{name}.duckdb")
        store.register_run(load_run(root / "tiny"))
        job = submit(store, spec)
        report = run_job(store, job) if name == "local" else run_job_ray(store, job, split="group")
        assert not report.failed
        stores.append(store.results("tiny").set_index("metric")["value"].sort_index())
    assert list(stores[0].index) == list(stores[1].index)
    assert any(m.startswith("finetune/copy/") for m in stores[0].index)
    torch.testing.assert_close(
        torch.tensor(stores[0].to_numpy()), torch.tensor(stores[1].to_numpy()), atol=2e-3, rtol=0
    )


def test_the_bundled_modsub_task_is_what_write_modsub_task_writes(tmp_path: Path) -> None:
    from analysis.finetune.data import MODSUB_DIR, load_task, write_modsub_task

    write_modsub_task(tmp_path)
    for name in ("train.jsonl", "test.jsonl"):
        assert (tmp_path / name).read_bytes() == (MODSUB_DIR / name).read_bytes()
    task = load_task("modsub")
    train = {p for p, _ in task.train}
    test = {json.loads(line)["prompt"] for line in (MODSUB_DIR / "test.jsonl").read_text().splitlines()}
    assert len(train) == 4000 and not train & test and all(" - " in p for p in train)


def test_a_corpus_level_score_gets_no_per_document_stderr(root: Path) -> None:
    from analysis.finetune.config import parse_config
    from analysis.finetune.probe import run_probe
    from tests.factories import tiny_model_and_tokenizer

    model, tok = tiny_model_and_tokenizer(0)
    given = {"task": str(root / "copy"), "steps": "3", "limit": "20"}
    rows = {r.metric: r for r in run_probe(model, tok, parse_config({**given, "score": "perplexity,none"}))}
    # lm-eval's per-document values of a perplexity are log-likelihoods: no stderr of the perplexity from them.
    assert rows["finetune/copy/gain"].stderr is None and rows["finetune/copy/post"].stderr is None
    assert rows["finetune/copy/post"].higher_is_better is False and rows["finetune/copy/pre"].value > 1
    rows = {r.metric: r for r in run_probe(model, tok, parse_config(given))}  # accuracy: a mean of documents
    assert rows["finetune/copy/gain"].stderr is not None and rows["finetune/copy/post"].higher_is_better is True


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"prompt": "1 - 1 ="}', r"train\.jsonl:2: needs 'prompt' and 'answer'"),
        ("not json", r"train\.jsonl:2: not valid JSON"),
    ],
)
def test_a_broken_line_of_a_jsonl_task_is_one_line_naming_it(tmp_path: Path, line: str, message: str) -> None:
    from analysis.finetune.data import load_task

    folder = tmp_path / "task"
    folder.mkdir()
    (folder / "train.jsonl").write_text('{"prompt": "2 - 1 =", "answer": "1"}\n' + line + "\n")
    (folder / "test.jsonl").write_text('{"prompt": "3 - 1 =", "answer": "2"}\n')
    with pytest.raises(ValueError, match=message) as info:
        load_task(str(folder))
    assert "\n" not in str(info.value)
