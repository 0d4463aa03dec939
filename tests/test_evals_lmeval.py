"""The lm-eval bridge on a tiny real checkpoint, bundled tasks, task resolution and result import."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from analysis.evals.lmeval import parse_results_file, run_lm_eval, step_from_text
from analysis.evals.tasks import (
    BUNDLED_TASKS,
    DEFAULT_DATA_DIR,
    bundled_proxy_items,
    materialize_tasks,
    modarith_choices,
    resolve_tasks,
    task_vocabulary,
)
from analysis.models import build_word_tokenizer, load_model, tiny_moe_config

ALL_TASKS = list(BUNDLED_TASKS)


def _modarith_record(a: int, b: int) -> dict:
    return {"a": a, "b": b, "op": "+", "prompt": f"{a} + {b} =", "answer": str((a + b) % 97)}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The bundled task data plus small modarith files in the generated format."""
    root = tmp_path_factory.mktemp("tasks_data")
    shutil.copytree(DEFAULT_DATA_DIR, root, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.jsonl"))
    for name in ("antonyms", "counting", "sequence", "cycles"):
        for split in ("train", "test"):
            shutil.copy(DEFAULT_DATA_DIR / name / f"{split}.jsonl", root / name / f"{split}.jsonl")
    pairs = [(a, b) for a in range(97) for b in range(97)]
    random.Random(0).shuffle(pairs)
    for name, chunk in (("heldout", pairs[:40]), ("train", pairs[40:100])):
        lines = "".join(json.dumps(_modarith_record(a, b)) + "\n" for a, b in chunk)
        (root / "modarith" / f"{name}.jsonl").write_text(lines)
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, data_dir):
    """A randomly initialised tiny OLMoE with a word tokenizer covering every bundled task."""
    from transformers import OlmoeForCausalLM

    folder = tmp_path_factory.mktemp("ckpt")
    words = [str(i) for i in range(97)] + ["+", "="]
    words += [w for w in task_vocabulary(data_dir) if w not in set(words)]
    tokenizer = build_word_tokenizer(words)
    torch.manual_seed(0)
    model = OlmoeForCausalLM(tiny_moe_config(len(tokenizer), hidden_size=64, num_heads=2))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_run_lm_eval_equals_lm_eval_loading_the_checkpoint_itself(tmp_path, data_dir, checkpoint):
    import lm_eval
    from lm_eval.tasks import TaskManager

    model, tokenizer = load_model(checkpoint, device="cpu")
    task_dir = tmp_path / "materialised"
    out = run_lm_eval(model, tokenizer, ALL_TASKS, batch_size=8, task_dir=task_dir, data_dir=data_dir)

    reference = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={checkpoint},dtype=float32",
        tasks=ALL_TASKS,
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
        batch_size=8,
        device="cpu",
        bootstrap_iters=1000,
        log_samples=False,
    )["results"]

    expected_keys = {f"{t}/{m}" for t in ALL_TASKS for m in BUNDLED_TASKS[t].metrics}
    assert set(out.values()) == expected_keys
    for row in out.rows:
        ref = reference[row.task]
        assert row.value == ref[row.metric], row.name  # exact: same model, same batches
        metric, filt = row.metric.split(",")
        assert row.stderr == pytest.approx(ref[f"{metric}_stderr,{filt}"], rel=1e-9, abs=1e-12), row.name
        assert row.n == ref["sample_len"]
        assert row.n_shot == 0
        assert row.task_version == "1.0"
    assert {r.n for r in out.rows if r.task.startswith("modarith")} == {40}

    # Per-sample records agree with the aggregates they came from.
    mc = [s for s in out.samples if s.task == "modarith_mc" and s.metric == "acc,none"]
    assert len(mc) == 40
    for s in mc:
        assert len(s.choices) == 4 and len(s.loglikelihoods) == 4
        assert s.value == float(s.response == s.target)
    acc = next(r for r in out.rows if r.name == "modarith_mc/acc,none")
    assert sum(s.value for s in mc) / len(mc) == pytest.approx(acc.value)
    em = [s for s in out.samples if s.task == "counting_em"]
    assert em and all(s.metric == "exact_match,first_word" and s.response is not None for s in em)
    assert model.training is False


@pytest.mark.slow
def test_task_yaml_path_and_device_check(tmp_path, data_dir, checkpoint):
    model, tokenizer = load_model(checkpoint, device="cpu")
    materialised = materialize_tasks(tmp_path / "m", data_dir)
    cfg = yaml.safe_load((materialised / "antonyms_mc.yaml").read_text())
    cfg["task"] = "my_antonyms"
    custom = tmp_path / "elsewhere" / "my_antonyms.yaml"
    custom.parent.mkdir()
    custom.write_text(yaml.safe_dump(cfg))
    out = run_lm_eval(model, tokenizer, [str(custom)], limit=5, task_dir=tmp_path / "m", data_dir=data_dir)
    assert {r.name for r in out.rows} == {"my_antonyms/acc,none", "my_antonyms/acc_norm,none"}
    assert all(r.n == 5 for r in out.rows)
    with pytest.raises(ValueError, match="the model is on cpu"):
        run_lm_eval(model, tokenizer, ["antonyms_mc"], device="cuda", task_dir=tmp_path / "m", data_dir=data_dir)


def test_uncached_hub_dataset_fails_offline_with_one_line(tmp_path, monkeypatch, data_dir, checkpoint):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tokenizer = load_model(checkpoint, device="cpu")
    remote = tmp_path / "remote.yaml"
    remote.write_text(
        "task: remote_task\ndataset_path: example-org/not-in-any-cache\noutput_type: loglikelihood\n"
        "test_split: test\ndoc_to_text: '{{q}}'\ndoc_to_target: '{{a}}'\n"
    )
    with pytest.raises(ValueError, match=r"OfflineModeIsEnabled.*not in the local Hugging Face cache") as err:
        run_lm_eval(model, tokenizer, [str(remote)], task_dir=tmp_path / "m", data_dir=data_dir)
    assert "\n" not in str(err.value)


def test_materialized_yaml_uses_absolute_paths(tmp_path, data_dir):
    dest = materialize_tasks(tmp_path / "m", data_dir)
    assert sorted(p.stem for p in dest.glob("*.yaml")) == sorted(ALL_TASKS)
    for path in dest.glob("*.yaml"):
        files = yaml.safe_load(path.read_text())["dataset_kwargs"]["data_files"]
        for file in files.values():
            assert Path(file).is_absolute() and Path(file).is_file()
    mc = [json.loads(line) for line in (dest / "modarith_mc" / "test.jsonl").read_text().splitlines()]
    assert len(mc) == 40
    assert all(r["choices"][r["label"]] == r["answer"] and len(set(r["choices"])) == 4 for r in mc)
    assert len({r["label"] for r in mc}) > 1  # the right answer does not sit in one slot


def test_modarith_choices_are_deterministic():
    pool = [str(i) for i in range(97)]
    record = _modarith_record(12, 40)
    first = modarith_choices(record, pool)
    assert modarith_choices(dict(record), list(reversed(pool))) == first
    choices, label = first
    assert choices[label] == "52" and len(set(choices)) == 4


def test_modarith_without_data_is_left_out_with_a_reason(tmp_path):
    data = tmp_path / "data"
    shutil.copytree(DEFAULT_DATA_DIR, data, ignore=shutil.ignore_patterns("heldout.jsonl", "train.jsonl"))
    for name in ("antonyms", "counting", "sequence", "cycles"):
        for split in ("train", "test"):
            shutil.copy(DEFAULT_DATA_DIR / name / f"{split}.jsonl", data / name / f"{split}.jsonl")
    dest = materialize_tasks(tmp_path / "m", data)
    assert not (dest / "modarith_mc.yaml").exists()
    with pytest.raises(ValueError, match=r"heldout\.jsonl: missing data for task 'modarith_em'"):
        resolve_tasks(["modarith_em"], task_dir=tmp_path / "m", data_dir=data)


def test_unknown_bundled_name_suggests_without_indexing(tmp_path, data_dir):
    with pytest.raises(ValueError, match=r"^unknown task 'modarith_emm'; did you mean 'modarith_em'\?$"):
        resolve_tasks(["modarith_emm"], task_dir=tmp_path, data_dir=data_dir, allow_builtin=False)


@pytest.mark.slow
def test_unknown_name_suggests_a_builtin_task(tmp_path, data_dir):
    # Indexes lm-eval's own ~14,700 tasks (a few seconds), all from local files.
    with pytest.raises(ValueError, match=r"^unknown task 'arc_esay'; did you mean 'arc_easy'\?$"):
        resolve_tasks(["arc_esay"], task_dir=tmp_path, data_dir=data_dir)
    plan = resolve_tasks(["arc_easy", "counting_em"], task_dir=tmp_path, data_dir=data_dir)
    assert plan.include_defaults and plan.specs == ("arc_easy", "counting_em")


def test_bad_task_yaml_paths(tmp_path, data_dir):
    with pytest.raises(ValueError, match=r"nope\.yaml: task YAML not found"):
        resolve_tasks([str(tmp_path / "nope.yaml")], task_dir=tmp_path / "m", data_dir=data_dir)
    broken = tmp_path / "broken.yaml"
    broken.write_text("task: x\ndoc_to_text: [unclosed\n")
    with pytest.raises(ValueError, match=r"broken\.yaml:\d+: not valid YAML") as err:
        resolve_tasks([str(broken)], task_dir=tmp_path / "m", data_dir=data_dir)
    assert "\n" not in str(err.value)
    nameless = tmp_path / "nameless.yaml"
    nameless.write_text("dataset_path: json\noutput_type: loglikelihood\n")
    with pytest.raises(ValueError, match=r"nameless\.yaml: no 'task' or 'group' key"):
        resolve_tasks([str(nameless)], task_dir=tmp_path / "m", data_dir=data_dir)


def test_task_vocabulary_covers_the_language_tasks(data_dir):
    vocab = set(task_vocabulary(data_dir))
    assert {"opposite", "monday", "three", "?"} <= vocab
    tokenizer = build_word_tokenizer(sorted(vocab))
    for name in ("antonyms_mc", "counting_em", "sequence_ll"):
        for prompt, solution in bundled_proxy_items(name, data_dir):
            assert tokenizer.unk_token_id not in tokenizer(f"{prompt} {solution}")["input_ids"]
    assert bundled_proxy_items("modarith_em", data_dir)[0][0].endswith(" =")


# --------------------------------------------------------------------------- importing result files

CURRENT = {
    "results": {
        "arc_easy": {
            "alias": "arc_easy",
            "acc,none": 0.5606,
            "acc_stderr,none": 0.0102,
            "acc_norm,none": 0.4937,
            "acc_norm_stderr,none": 0.0103,
        },
        "lambada_openai": {
            "alias": "lambada_openai",
            "perplexity,none": 21.43,
            "perplexity_stderr,none": 0.78,
            "acc,none": 0.4423,
            "acc_stderr,none": "N/A",
        },
        "gsm8k": {
            "alias": "gsm8k",
            "exact_match,strict-match": 0.0152,
            "exact_match_stderr,strict-match": 0.0034,
            "exact_match,flexible-extract": float("nan"),
            "exact_match_stderr,flexible-extract": 0.004,
        },
    },
    "group_subtasks": {"arc_easy": [], "lambada_openai": [], "gsm8k": []},
    "configs": {"arc_easy": {"task": "arc_easy", "output_type": "multiple_choice"}},
    "versions": {"arc_easy": 1.0, "lambada_openai": 1.0, "gsm8k": 3.0},
    "n-shot": {"arc_easy": 0, "lambada_openai": 0, "gsm8k": 5},
    "higher_is_better": {"arc_easy": {"acc": True, "acc_norm": True}},
    "n-samples": {"arc_easy": {"original": 2376, "effective": 2376}, "gsm8k": {"original": 1319, "effective": 1319}},
    "config": {
        "model": "hf",
        "model_args": "pretrained=allenai/OLMo-1B-hf,revision=stage1-step20000-tokens84B,dtype=bfloat16",
        "model_revision": "main",
        "batch_size": "auto",
        "bootstrap_iters": 100000,
    },
    "git_hash": "a1b2c3d",
    "date": 1717171717.0,
    "lm_eval_version": "0.4.13",
}

LEGACY = {
    "results": {
        "lambada_openai": {"ppl": 9.39, "ppl_stderr": 0.26, "acc": 0.5959, "acc_stderr": 0.0068},
        "piqa": {"acc": 0.7165, "acc_stderr": 0.0105, "acc_norm": 0.7176, "acc_norm_stderr": 0.0105},
        "winogrande": {"acc": "n/a", "acc_stderr": 0.014},
    },
    "versions": {"lambada_openai": 0, "piqa": 0, "winogrande": 0},
    "config": {
        "model": "gpt2",
        "model_args": "pretrained=EleutherAI/pythia-1.4b-deduped,revision=step83000",
        "num_fewshot": 0,
        "batch_size": 16,
        "device": "cuda:0",
        "no_cache": True,
        "limit": None,
        "bootstrap_iters": 100000,
        "description_dict": {},
    },
}


def _write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    # json.dumps writes NaN as the bare literal NaN, as Python-written result files do.
    path.write_text(json.dumps(data, indent=2))
    return path


def test_parse_current_schema(tmp_path):
    imported = parse_results_file(_write(tmp_path / "results_2024-06-01T00-00-00.json", CURRENT))
    assert imported.step == 20000 and imported.step_source == "model_args revision"
    rows = {r.name: r for r in imported.rows}
    assert rows["arc_easy/acc,none"].value == 0.5606
    assert rows["arc_easy/acc,none"].stderr == 0.0102
    assert rows["arc_easy/acc,none"].n == 2376
    assert rows["arc_easy/acc,none"].higher_is_better is True
    assert rows["lambada_openai/acc,none"].stderr is None  # "N/A"
    assert rows["gsm8k/exact_match,strict-match"].n_shot == 5
    assert rows["gsm8k/exact_match,strict-match"].task_version == "3.0"
    assert "gsm8k/exact_match,flexible-extract" not in rows  # NaN is skipped ...
    assert any("flexible-extract is NaN" in p for p in imported.problems)  # ... and said so
    assert not any(name.endswith(("alias", "_stderr,none")) for name in rows)


def test_parse_legacy_schema(tmp_path):
    imported = parse_results_file(_write(tmp_path / "pythia" / "results.json", LEGACY))
    assert imported.step == 83000
    rows = {r.name: r for r in imported.rows}
    assert rows["piqa/acc_norm,none"].value == 0.7176
    assert rows["piqa/acc_norm,none"].stderr == 0.0105
    assert rows["lambada_openai/ppl,none"].value == 9.39
    assert rows["piqa/acc,none"].n is None and rows["piqa/acc,none"].n_shot == 0
    assert rows["piqa/acc,none"].task_version == "0"
    assert "winogrande/acc,none" not in rows
    assert any("winogrande/acc,none is not a number" in p for p in imported.problems)


def test_step_from_path_then_argument(tmp_path):
    no_revision = {**LEGACY, "config": {"model_args": "pretrained=/models/run7"}}
    assert parse_results_file(_write(tmp_path / "results_step1000.json", no_revision)).step == 1000
    nested = parse_results_file(_write(tmp_path / "step_2500" / "results.json", no_revision))
    assert (nested.step, nested.step_source) == (2500, "path")
    plain = _write(tmp_path / "plain" / "results.json", no_revision)
    assert parse_results_file(plain, step=42).step_source == "argument"
    with pytest.raises(ValueError, match=r"results\.json: cannot tell the checkpoint step"):
        parse_results_file(plain)
    assert step_from_text("checkpoint-300") == 300 and step_from_text("main") is None


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", r"not valid JSON \(line 1"),
        ('{"config": {}}', r"no 'results' object"),
        ('{"results": {"piqa": {"acc": "high"}}, "config": {"model_args": "revision=step1"}}', r"no numeric metric"),
    ],
)
def test_bad_result_files(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as err:
        parse_results_file(path, step=1)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ValueError, match="file not found"):
        parse_results_file(tmp_path / "missing.json")


@pytest.mark.slow
def test_continuous_metrics_equal_a_hand_computation_from_the_per_choice_log_likelihoods(
    tmp_path, data_dir, checkpoint
):
    import math

    from analysis.evals.continuous import continuous_metrics

    model, tokenizer = load_model(checkpoint, device="cpu")
    out = run_lm_eval(model, tokenizer, ["modarith_mc"], batch_size=8, task_dir=tmp_path / "m", data_dir=data_dir)
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    rows = {r.name: r for r in continuous_metrics(out.samples, encode)}
    items = [s for s in out.samples if s.metric == "acc,none"]
    assert len(items) == 40 and {r.n for r in rows.values()} == {40}  # acc and acc_norm records count once
    p, margin, nll_tok, bpb = [], [], [], []
    for s in items:
        lls, c = list(s.loglikelihoods), int(s.target)
        total = sum(math.exp(v) for v in lls)
        p.append(math.exp(lls[c]) / total)
        margin.append(lls[c] - max(v for j, v in enumerate(lls) if j != c))
        # The word tokenizer gives each answer (" 52") one token; its bytes include the leading space.
        assert len(encode(s.prompt + s.choices[c])) - len(encode(s.prompt)) == 1
        nll_tok.append(-lls[c])
        bpb.append(-lls[c] / math.log(2) / len(s.choices[c].encode()))
    for name, values in (("p_correct", p), ("margin", margin), ("nll_per_token", nll_tok), ("bits_per_byte", bpb)):
        assert rows[name].value == pytest.approx(np.mean(values), rel=1e-12), name
        assert rows[name].stderr == pytest.approx(np.std(values, ddof=1) / math.sqrt(40), rel=1e-9), name
        assert rows[name].metric == f"modarith_mc/{name},none"
    acc = next(r for r in out.rows if r.name == "modarith_mc/acc,none").value
    assert acc == pytest.approx(np.mean([m > 0 for m in margin]))  # right exactly when the margin is positive
    # lm-eval's log-likelihood of one answer, recomputed by a forward pass of our own.
    s = items[0]
    ids = torch.tensor([tokenizer(s.prompt + s.choices[0])["input_ids"]])  # with BOS, as lm-eval scores it
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, -2].float(), -1)[ids[0, -1]].item()
    assert logp == pytest.approx(s.loglikelihoods[0], abs=1e-4)


@pytest.mark.slow
def test_log_samples_files_lm_eval_writes_give_the_continuous_metrics_at_import(tmp_path, data_dir, checkpoint):
    """A real `--log_samples` output folder, written by lm-eval's own EvaluationTracker from a real run."""
    import lm_eval
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.tasks import TaskManager

    from analysis.evals.continuous import continuous_metrics
    from analysis.evals.lmeval import samples_from_results

    include = materialize_tasks(tmp_path / "tasks", data_dir)
    tracker = EvaluationTracker(output_path=str(tmp_path / "out"))
    results = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={checkpoint},dtype=float32", tasks=["modarith_mc"],
        task_manager=TaskManager(include_path=str(include), include_defaults=False), batch_size=8, device="cpu",
        log_samples=True, evaluation_tracker=tracker,
    )  # fmt: skip
    samples = results.pop("samples")
    tracker.save_results_aggregated(results=results, samples=samples)
    tracker.save_results_samples(task_name="modarith_mc", samples=samples["modarith_mc"])
    (result_file,) = (tmp_path / "out").rglob("results_*.json")
    assert list(result_file.parent.glob("samples_modarith_mc_*.jsonl"))

    imported = parse_results_file(result_file, step=20)
    rows = {r.name: r for r in imported.rows}
    expected = continuous_metrics(samples_from_results({"configs": results["configs"], "samples": samples}))
    assert {c.metric for c in expected} == {f"modarith_mc/{n},none" for n in ("p_correct", "margin", "bits_per_byte")}
    for c in expected:  # the file's strings give back the in-memory floats
        assert rows[c.metric].value == pytest.approx(c.value, rel=1e-12) and rows[c.metric].n == 40
    right = [m > 0 for m in _margins(samples["modarith_mc"])]  # right exactly when the margin is positive
    assert rows["modarith_mc/acc,none"].value == pytest.approx(np.mean(right))


def _margins(items: list[dict]) -> list[float]:
    out = []
    for item in items:
        lls = [float(r[0]) for r in item["filtered_resps"]]
        c = int(item["target"])
        out.append(lls[c] - max(v for j, v in enumerate(lls) if j != c))
    return out
