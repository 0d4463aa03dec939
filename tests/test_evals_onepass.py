"""One forward pass per context (analysis/evals/onepass.py) against lm-eval's own HF backend.

Every bundled loglikelihood / multiple-choice task is run by lm-eval's task code through both
backends on tiny real checkpoints (GPT-NeoX, Llama with grouped-query attention, OLMoE; random
weights). Per-request log-likelihoods must agree to 1e-6 relative: HFLM itself moves by that much
(1.9e-6 on a sum near -20, one float32 ulp) when only its batch size changes.
"""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch
import yaml

from analysis.evals.cycles import cycles_records, write_cycles_task
from analysis.evals.lmeval import run_lm_eval
from analysis.evals.onepass import BACKEND_NAME, MIN_SAVING, OnePassLM, head_weight, work_saving
from analysis.evals.tasks import BUNDLED_TASKS, DEFAULT_DATA_DIR, materialize_tasks, task_vocabulary
from analysis.models import build_word_tokenizer, tiny_moe_config

# Tiny tensors: threads only add synchronisation. Slow: compares with lm-eval's own HFLM on tiny checkpoints
# (`make test-fast` leaves it out).
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]

LL_TASKS = [t.name for t in BUNDLED_TASKS.values() if t.output_type in ("multiple_choice", "loglikelihood")]
TOL = {"rel": 1e-6, "abs": 1e-6}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The bundled task data plus a small modarith split in the generated format."""
    root = tmp_path_factory.mktemp("tasks_data")
    shutil.copytree(DEFAULT_DATA_DIR, root, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.jsonl"))
    for task in BUNDLED_TASKS.values():
        for split in ("train", "test"):
            if (DEFAULT_DATA_DIR / task.folder / f"{split}.jsonl").is_file():
                shutil.copy(DEFAULT_DATA_DIR / task.folder / f"{split}.jsonl", root / task.folder / f"{split}.jsonl")
    pairs = [(a, b) for a in range(97) for b in range(97)]
    random.Random(1).shuffle(pairs)
    for name, chunk in (("heldout", pairs[:24]), ("train", pairs[24:40])):
        lines = "".join(
            json.dumps({"a": a, "b": b, "op": "+", "prompt": f"{a} + {b} =", "answer": str((a + b) % 97)}) + "\n"
            for a, b in chunk
        )
        (root / "modarith" / f"{name}.jsonl").write_text(lines)
    return root


@pytest.fixture(scope="module")
def include(tmp_path_factory, data_dir):
    return materialize_tasks(tmp_path_factory.mktemp("materialised"), data_dir)


@pytest.fixture(scope="module")
def tokenizer(data_dir):
    words = [str(i) for i in range(97)] + ["+", "="]
    return build_word_tokenizer(words + [w for w in task_vocabulary(data_dir) if w not in set(words)])


def _model(kind: str, vocab: int, max_positions: int = 128):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM, OlmoeForCausalLM

    torch.manual_seed(0)
    special = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    shape = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128}
    if kind == "gpt_neox":
        model = GPTNeoXForCausalLM(
            GPTNeoXConfig(vocab_size=vocab, max_position_embeddings=max_positions, **shape, **special)
        )
    elif kind == "llama":  # grouped-query attention: two key/value heads for four query heads
        config = LlamaConfig(
            vocab_size=vocab, max_position_embeddings=max_positions, num_key_value_heads=2, **shape, **special
        )
        model = LlamaForCausalLM(config)
    else:
        model = OlmoeForCausalLM(tiny_moe_config(vocab, hidden_size=64, num_heads=2, max_positions=max_positions))
    return model.eval()


def _evaluate(lm, include, tasks):
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks,
        task_manager=TaskManager(include_path=str(include), include_defaults=False),
        bootstrap_iters=0,
        log_samples=True,
    )


def _assert_same(ours: dict, theirs: dict, tasks: list[str]) -> int:
    """Per-request (log-likelihood, is_greedy) and final metrics agree; return the requests compared."""
    compared = 0
    for task in tasks:
        mine, ref = ours["samples"][task], theirs["samples"][task]
        assert [s["doc_id"] for s in mine] == [s["doc_id"] for s in ref]
        for a, b in zip(mine, ref, strict=True):
            assert len(a["resps"]) == len(b["resps"]) > 0
            for (ll_a, greedy_a), (ll_b, greedy_b) in zip(
                [r[0] for r in a["resps"]], [r[0] for r in b["resps"]], strict=True
            ):
                assert ll_a == pytest.approx(ll_b, **TOL), (task, a["doc_id"])
                assert greedy_a == greedy_b, (task, a["doc_id"])
                compared += 1
        for key, value in theirs["results"][task].items():
            if key == "perplexity,none":  # exp of the mean log-likelihood: rounding carries through
                assert ours["results"][task][key] == pytest.approx(value, rel=1e-5), (task, key)
            else:  # accuracies count argmaxes and greedy flags: identical
                assert ours["results"][task][key] == value, (task, key)
    return compared


@pytest.mark.parametrize("kind", ["gpt_neox", "llama", "olmoe"])
def test_every_bundled_loglikelihood_task_matches_hflm(kind, include, tokenizer):
    from lm_eval.models.huggingface import HFLM

    model = _model(kind, len(tokenizer))
    theirs = _evaluate(HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8), include, LL_TASKS)
    lm = OnePassLM(pretrained=model, tokenizer=tokenizer, batch_size=8, onepass="always")
    ours = _evaluate(lm, include, LL_TASKS)
    assert lm.paths == {task: "onepass" for task in LL_TASKS}  # nothing fell back to HFLM's path
    assert _assert_same(ours, theirs, LL_TASKS) == 4 * 24 + 4 * 40 + 4 * 30 + 28  # modarith, cycles, antonyms, sequence


def test_registered_by_name_truncation_and_auto(include, tokenizer):
    """lm-eval builds the backend from its name; requests longer than the window go to HFLM's path."""
    import lm_eval
    from lm_eval.api.registry import get_model
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    assert get_model(BACKEND_NAME) is OnePassLM
    # 32 positions: cycles_mc's longer contexts (up to 40 words) are truncated from the left.
    model = _model("llama", len(tokenizer), max_positions=32)
    tasks = ["cycles_mc", "antonyms_mc"]
    theirs = _evaluate(HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4), include, tasks)
    ours = lm_eval.simple_evaluate(
        model=BACKEND_NAME,
        model_args={"pretrained": model, "tokenizer": tokenizer, "onepass": "auto"},
        batch_size=4,
        tasks=tasks,
        task_manager=TaskManager(include_path=str(include), include_defaults=False),
        bootstrap_iters=0,
        log_samples=True,
    )
    _assert_same(ours, theirs, tasks)
    assert ours["config"]["model"] == BACKEND_NAME


def test_a_cache_it_cannot_copy_falls_back_to_hflm(include, tokenizer):
    """A sliding-window model keeps only the window in its cache: scored by HFLM's path, unchanged."""
    from lm_eval.models.huggingface import HFLM
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128, sliding_window=8,
    )  # fmt: skip
    model = MistralForCausalLM(config).eval()
    theirs = _evaluate(HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8), include, ["cycles_mc"])
    lm = OnePassLM(pretrained=model, tokenizer=tokenizer, batch_size=8, onepass="always")
    ours = _evaluate(lm, include, ["cycles_mc"])
    assert lm.paths == {"cycles_mc": "hf"}
    mine = [r[0] for s in ours["samples"]["cycles_mc"] for r in s["resps"]]
    assert mine == [r[0] for s in theirs["samples"]["cycles_mc"] for r in s["resps"]]  # the same path: exact


def test_auto_scores_only_where_the_context_is_shared(include, tokenizer):
    model = _model("gpt_neox", len(tokenizer))
    lm = OnePassLM(pretrained=model, tokenizer=tokenizer, batch_size=8)
    _evaluate(lm, include, LL_TASKS)
    # One-word choices on a 250-word vocabulary: HFLM's logits cache already scores them from one pass.
    assert lm.paths == {"cycles_mc": "onepass", "antonyms_mc": "hf", "modarith_mc": "hf", "sequence_ll": "hf"}


def test_work_saving_counts_what_each_path_computes():
    ctx = [1, 5, 6, 7, 8, 9]  # six tokens shared by three two-token choices
    reqs = [(("c", f" {k}"), ctx, [10 + k, 20]) for k in range(3)]
    # HFLM: 3 x (6 + 1) tokens, every position projected; one pass: 6 + 3 x 1 tokens, 1 + 3 x 1 projected.
    assert work_saving(reqs) == pytest.approx(21 / 9)
    assert work_saving(reqs, head=2.0) == pytest.approx(21 * 3 / (9 + 2 * 4))
    single = [(("c", f" {k}"), ctx, [10 + k]) for k in range(3)]
    assert work_saving(single) == pytest.approx(1.0)  # HFLM's logits cache merges these already
    assert work_saving(single, head=2.0) == pytest.approx(6 * 3 / (6 + 2))  # but HFLM projects 6 positions
    assert work_saving(single, head=2.0) > MIN_SAVING
    # A GPT-NeoX's output layer against the rest: vocabulary x width over the body's weights.
    model = _model("gpt_neox", 1000)
    outer = ("gpt_neox.embed_in.weight", "lm_head.weight")
    body = sum(p.numel() for n, p in model.named_parameters() if n not in outer)
    assert body == 2 * (64 * 192 + 192 + 64 * 64 + 64 + 2 * 64 * 128 + 128 + 64 + 4 * 64) + 2 * 64  # by hand
    assert head_weight(model) == pytest.approx(1000 * 64 / body)


def test_run_lm_eval_backends_agree_and_bad_names(tmp_path, data_dir, tokenizer):
    model = _model("olmoe", len(tokenizer))
    kw = {"task_dir": tmp_path / "m", "data_dir": data_dir, "bootstrap_iters": 0}
    hf = run_lm_eval(model, tokenizer, ["cycles_mc"], backend="hf", **kw)
    one = run_lm_eval(model, tokenizer, ["cycles_mc"], backend="onepass", **kw)
    assert one.values() == hf.values() and one.settings["backend"] == "onepass"
    for a, b in zip(one.samples, hf.samples, strict=True):
        assert a.loglikelihoods == pytest.approx(b.loglikelihoods, **TOL)
    with pytest.raises(ValueError, match=r"^unknown lm-eval backend 'onepas'; did you mean 'onepass'\?$"):
        run_lm_eval(model, tokenizer, ["cycles_mc"], backend="onepas", **kw)
    with pytest.raises(ValueError, match=r"^onepass must be one of auto, always, got 'yes'$"):
        OnePassLM(pretrained=model, tokenizer=tokenizer, onepass="yes")


def test_an_empty_choice_is_a_one_line_error(tmp_path, data_dir, tokenizer):
    """A choice that encodes to no tokens (HFLM only asserts) names the request and the fix."""
    # lm-eval checks only the first document's choices (and fails on an empty one with an IndexError).
    records = [
        {"prompt": "the opposite of up is", "choices": ["down", "left"], "label": 0},
        {"prompt": "the opposite of hot is", "choices": ["cold", ""], "label": 0},
    ]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = yaml.safe_load((DEFAULT_DATA_DIR / "antonyms" / "antonyms_mc.yaml").read_text())
    cfg.update(task="empty_choice", dataset_kwargs={"data_files": {"test": str(tmp_path / "test.jsonl")}})
    del cfg["training_split"], cfg["fewshot_split"]
    (tmp_path / "empty_choice.yaml").write_text(yaml.safe_dump(cfg))
    model = _model("gpt_neox", len(tokenizer))
    task = str(tmp_path / "empty_choice.yaml")
    with pytest.raises(
        ValueError, match=r"has an empty continuation; every choice must encode to at least one token"
    ) as err:
        run_lm_eval(model, tokenizer, [task], backend="onepass", task_dir=tmp_path / "m", data_dir=data_dir)
    assert "\n" not in str(err.value) and "'the opposite of hot is'" in str(err.value)


def test_cycles_data_is_what_the_generator_writes(tmp_path, tokenizer):
    written = write_cycles_task(tmp_path)
    for path in written:
        assert path.read_text() == (DEFAULT_DATA_DIR / "cycles" / path.name).read_text()
    for record in cycles_records(50, seed=3, context_words=(5, 9)):
        assert len(set(record["choices"])) == 4 and record["choices"][record["label"]] == record["solution"]
        assert 5 <= len(record["prompt"].split()) <= 9
        ids = tokenizer(f"{record['prompt']} {' '.join(record['choices'])}")["input_ids"]
        assert tokenizer.unk_token_id not in ids
    with pytest.raises(ValueError, match=r"context_words must be 1 <= low <= high, got \(4, 2\)"):
        cycles_records(1, seed=0, context_words=(4, 2))
