"""The embedded demo: layout, logs, loadable checkpoints, determinism, resumable builds, task files.

One short scaled build (30 steps per run, 4 checkpoints) is shared by the module; a second build
into another folder checks determinism.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from analysis import demo
from analysis.models import load_model

SCALE = 0.01  # 3,000 steps -> 30, 12 checkpoints -> 4


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, list[Path]]:
    torch.set_num_threads(min(2, torch.get_num_threads()))
    root = tmp_path_factory.mktemp("demo")
    return root, demo.build_demo(root, scale=SCALE)


# ----------------------------------------------------------------------------- config and split


def test_config_validation_names_every_problem():
    with pytest.raises(ValueError, match=r"p=91 must be a prime.*train_fraction=1\.5"):
        demo.DemoConfig(p=91, train_fraction=1.5)
    with pytest.raises(ValueError, match="top_k=3"):
        demo.DemoConfig(num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="scale"):
        demo.DemoConfig().scaled(0)


def test_scaled_shrinks_steps_and_checkpoints():
    cfg = demo.DEMO_RUNS["grokking"].scaled(SCALE)
    assert cfg.steps == round(demo.DEMO_RUNS["grokking"].steps * SCALE)
    assert cfg.n_checkpoints == 4
    assert cfg.weight_decay == demo.DEMO_RUNS["grokking"].weight_decay
    assert demo.DEMO_RUNS["grokking"].scaled(1.0) == demo.DEMO_RUNS["grokking"]


def test_demo_runs_are_scored_on_pairs_neither_trains_on():
    grok, mem = demo.DEMO_RUNS["grokking"], demo.DEMO_RUNS["memorizing"]
    assert (grok.p, grok.seed, grok.op) == (mem.p, mem.seed, mem.op)
    assert grok.weight_decay > mem.weight_decay and grok.train_fraction > mem.train_fraction
    heldout = set(demo.split_pairs(grok.p, demo.EVAL_TRAIN_FRACTION, grok.seed)[1])
    for cfg in (grok, mem):
        assert heldout.isdisjoint(demo.split_pairs(cfg.p, cfg.train_fraction, cfg.seed)[0])


def test_split_pairs_partitions_all_pairs_deterministically():
    train, heldout = demo.split_pairs(13, 0.5, seed=3)
    n_unordered = round(0.5 * 91)  # 13 * 14 / 2 unordered pairs, diagonal included
    assert len({tuple(sorted(pair)) for pair in train}) == n_unordered
    assert len(train) + len(heldout) == 169
    assert len(train) == len(set(train))
    assert set(train).isdisjoint(heldout)
    assert set(train) | set(heldout) == {(a, b) for a in range(13) for b in range(13)}
    assert demo.split_pairs(13, 0.5, seed=3) == (train, heldout)
    assert demo.split_pairs(13, 0.5, seed=4)[0] != train


def test_split_pairs_keeps_both_orders_of_a_pair_on_one_side():
    train, heldout = demo.split_pairs(13, 0.5, seed=0)
    assert all((b, a) in set(train) for a, b in train)
    assert all((b, a) in set(heldout) for a, b in heldout)


def test_split_pairs_is_nested_across_fractions():
    small_train, big_heldout = demo.split_pairs(97, 0.3, seed=0)
    train, heldout = demo.split_pairs(97, 0.7, seed=0)
    assert set(small_train) < set(train)
    assert set(heldout) < set(big_heldout)
    # Each side is shuffled: its first records are a fair sample, not one corner of the table.
    assert 0.4 < sum(a < b for a, b in heldout[:1000]) / 1000 < 0.6
    assert {a for a, _ in heldout[:1000]} == set(range(97))


def test_eval_pairs_are_held_out_by_every_demo_run():
    evals = [demo.eval_pairs(cfg) for cfg in demo.DEMO_RUNS.values()]
    assert evals[0] == evals[1] and len(evals[0]) == demo.DEMO_RUNS["grokking"].eval_samples
    for cfg in demo.DEMO_RUNS.values():
        assert set(evals[0]).isdisjoint(demo.split_pairs(cfg.p, cfg.train_fraction, cfg.seed)[0])


def test_checkpoint_steps_are_log_spaced_and_end_at_the_last_step():
    steps = demo.checkpoint_steps(600, 16)
    assert steps[-1] == 600
    assert 12 <= len(steps) <= 16
    assert steps == sorted(set(steps))
    ratios = [b / a for a, b in itertools.pairwise(steps)]
    assert max(ratios) < 2.0  # no big hole at the end, unlike linear spacing's front
    assert demo.checkpoint_steps(30, 4) == [1, 3, 10, 30]


def test_demo_checkpoints_are_dense_over_the_second_half():
    cfg = demo.DemoConfig(steps=500, n_checkpoints=12, dense_every=25)
    steps = cfg.checkpoint_steps()
    late = [s for s in steps if s >= 250]
    assert late == list(range(250, 501, 25))  # where the demo runs memorise and generalise
    assert [s for s in steps if s < 250] == [s for s in demo.checkpoint_steps(500, 12) if s < 250]
    assert demo.DemoConfig(steps=500, n_checkpoints=12, dense_every=0).checkpoint_steps() == demo.checkpoint_steps(
        500, 12
    )
    assert cfg.scaled(0.05).dense_every == 0
    # From a share of the run: log-spaced before it, every dense_every steps from it to the end.
    early = demo.DemoConfig(steps=3000, n_checkpoints=12, dense_every=100, dense_from=0.15).checkpoint_steps()
    assert [s for s in early if s >= 450] == [*range(450, 3000, 100), 3000]
    assert [s for s in early if s < 450] == [s for s in demo.checkpoint_steps(3000, 12) if s < 450]
    with pytest.raises(ValueError, match=r"dense_from=1\.5"):
        demo.DemoConfig(dense_from=1.5)


def test_encode_pairs_matches_the_tokenizer():
    tok = demo.build_word_tokenizer(demo.vocabulary(97))
    ids = demo.encode_pairs([(12, 40), (96, 5)], 97, "+", tok)
    assert ids.shape == (2, demo.SEQ_LEN)
    assert ids[0].tolist() == tok("12 + 40 = 52")["input_ids"] + [tok.eos_token_id]
    assert ids[1].tolist() == tok("96 + 5 = 4")["input_ids"] + [tok.eos_token_id]


# ----------------------------------------------------------------------------- bundled task files


@pytest.mark.parametrize("name", ["heldout", "train"])
def test_bundled_task_files_match_the_demo_split(name):
    cfg = demo.DEMO_RUNS["grokking"]
    train, heldout = demo.split_pairs(cfg.p, cfg.train_fraction, cfg.seed)
    rows = _read_jsonl(demo.TASK_DIR / f"{name}.jsonl")
    assert [(r["a"], r["b"]) for r in rows] == (heldout if name == "heldout" else train)
    for r in rows:
        assert r["op"] == "+"
        assert r["answer"] == str((r["a"] + r["b"]) % cfg.p)
        assert r["prompt"] == f"{r['a']} + {r['b']} ="


def test_bundled_heldout_is_disjoint_from_train():
    heldout = {(r["a"], r["b"]) for r in _read_jsonl(demo.TASK_DIR / "heldout.jsonl")}
    train = {(r["a"], r["b"]) for r in _read_jsonl(demo.TASK_DIR / "train.jsonl")}
    assert heldout.isdisjoint(train)
    assert len(heldout) + len(train) == demo.DEMO_RUNS["grokking"].p ** 2


def test_write_task_files_reproduces_the_bundled_files(tmp_path):
    train_path, heldout_path = demo.write_task_files(tmp_path, demo.DEMO_RUNS["grokking"])
    assert heldout_path.read_bytes() == (demo.TASK_DIR / "heldout.jsonl").read_bytes()
    assert train_path.read_bytes() == (demo.TASK_DIR / "train.jsonl").read_bytes()


# ----------------------------------------------------------------------------- the scaled build


@pytest.mark.slow
def test_build_layout(built):
    _, run_dirs = built
    assert [d.name for d in run_dirs] == list(demo.DEMO_RUNS)
    for run_dir in run_dirs:
        cfg = demo.DEMO_RUNS[run_dir.name].scaled(SCALE)
        steps = cfg.checkpoint_steps()
        assert sorted(p.name for p in run_dir.glob("step_*")) == sorted(f"step_{s}" for s in steps)
        for s in steps:
            folder = run_dir / f"step_{s}"
            assert (folder / "model.safetensors").is_file()
            assert (folder / "config.json").is_file()
            assert (folder / "tokenizer.json").is_file()
        info = json.loads((run_dir / "run.json").read_text())
        assert info["config"]["weight_decay"] == cfg.weight_decay
        assert info["config"]["steps"] == cfg.steps
        assert info["checkpoint_steps"] == steps
        assert info["n_train"] == len(demo.split_pairs(cfg.p, cfg.train_fraction, cfg.seed)[0])
        assert info["n_train"] + info["n_heldout"] == cfg.p**2
        assert info["n_eval"] == cfg.eval_samples
        assert demo.is_complete(run_dir, cfg)


@pytest.mark.slow
def test_metrics_log(built):
    _, run_dirs = built
    for run_dir in run_dirs:
        cfg = demo.DEMO_RUNS[run_dir.name].scaled(SCALE)
        rows = _read_jsonl(run_dir / "metrics.jsonl")
        assert [r["step"] for r in rows] == list(range(1, cfg.steps + 1))
        assert [r["tokens"] for r in rows] == [r["step"] * cfg.batch_size * demo.SEQ_LEN for r in rows]
        for r in rows:
            assert math.isfinite(r["train/loss"]) and 0 <= r["train/accuracy"] <= 1
            assert 0 < r["train/learning_rate"] <= cfg.lr
        evals = [r for r in rows if "eval/accuracy" in r]
        ckpt_steps = set(cfg.checkpoint_steps())
        assert ckpt_steps <= {r["step"] for r in evals}
        assert all(0 <= r["eval/accuracy"] <= 1 and math.isfinite(r["eval/loss"]) for r in evals)
        # In 25 steps the loss drops from its random-init value (~4.7) to about uniform guessing
        # (ln 97 = 4.57); the real fit starts only after ~250 steps.
        first = sum(r["train/loss"] for r in rows[:5]) / 5
        last = sum(r["train/loss"] for r in rows[-5:]) / 5
        assert last < first - 0.05
        assert last < math.log(cfg.p) + 0.1


@pytest.mark.slow
def test_checkpoints_load_with_default_experts_and_give_the_same_logits(built):
    _, run_dirs = built
    run_dir = run_dirs[0]
    cfg = demo.DEMO_RUNS[run_dir.name].scaled(SCALE)
    folder = run_dir / f"step_{cfg.steps}"
    assert "experts_implementation" not in (folder / "config.json").read_text()

    model, tok = load_model(folder, device="cpu")
    assert model.config._experts_implementation != "eager"  # the default, not the training kernel
    eager, _ = load_model(folder, device="cpu", experts_implementation="eager")
    ids = tok(["12 + 40 =", "3 + 95 ="], return_tensors="pt")["input_ids"]  # (2, 5)
    assert ids[:, 0].tolist() == [tok.bos_token_id] * 2
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, eager(input_ids=ids).logits, rtol=1e-5, atol=1e-5)

    # The saved weights reproduce the final held-out metrics the trainer logged.
    rows = _read_jsonl(run_dir / "metrics.jsonl")
    loss, acc = demo.evaluate(model, demo.encode_pairs(demo.eval_pairs(cfg), cfg.p, cfg.op, tok))
    assert loss == pytest.approx(rows[-1]["eval/loss"], abs=1e-4)
    assert acc == pytest.approx(rows[-1]["eval/accuracy"], abs=1e-6)


@pytest.mark.slow
def test_same_seed_gives_identical_weights(built, tmp_path):
    # Retrain the start of the built grokking run here, with the thread count its worker process
    # used; evaluations do not touch the weights or the batch order, so its checkpoints must match
    # the build's bit for bit.
    _, run_dirs = built
    cfg = demo.DEMO_RUNS["grokking"].scaled(SCALE)
    threads = json.loads((run_dirs[0] / "run.json").read_text())["torch_threads"]
    built_steps = cfg.checkpoint_steps()  # [1, 3, 9, 25]
    short = replace(cfg, steps=built_steps[-2])
    shared = sorted(set(built_steps) & set(short.checkpoint_steps()))
    assert len(shared) >= 2
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        again = demo.train_run(short, tmp_path / "again")
        other = demo.train_run(replace(short, seed=1, steps=1), tmp_path / "other")
    finally:
        torch.set_num_threads(before)
    for step in shared:
        ours = (again / f"step_{step}" / "model.safetensors").read_bytes()
        assert ours == (run_dirs[0] / f"step_{step}" / "model.safetensors").read_bytes()
    logged = _read_jsonl(run_dirs[0] / "metrics.jsonl")[: short.steps]
    assert [r["train/loss"] for r in _read_jsonl(again / "metrics.jsonl")] == [r["train/loss"] for r in logged]

    # A different seed gives different weights from the first step on.
    first = load_file(run_dirs[0] / "step_1" / "model.safetensors")
    changed = load_file(other / "step_1" / "model.safetensors")
    assert first.keys() == changed.keys()
    assert not torch.equal(first["lm_head.weight"], changed["lm_head.weight"])


@pytest.mark.slow
def test_complete_marker_skips_and_missing_marker_rebuilds(built):
    root, run_dirs = built
    grok, mem = run_dirs
    grok_weights = grok / "step_1" / "model.safetensors"
    mem_weights = mem / "step_1" / "model.safetensors"
    grok_mtime, mem_mtime = grok_weights.stat().st_mtime_ns, mem_weights.stat().st_mtime_ns
    calls: list[tuple[int, int]] = []

    # Everything complete: nothing is retrained, progress still reaches the total.
    demo.build_demo(root, scale=SCALE, progress=lambda done, total: calls.append((done, total)))
    assert grok_weights.stat().st_mtime_ns == grok_mtime
    assert mem_weights.stat().st_mtime_ns == mem_mtime
    assert calls[-1][0] == calls[-1][1] == 2 * demo.DEMO_RUNS["grokking"].scaled(SCALE).steps

    # An interrupted build (no marker, a stray file) is redone from scratch; the other run is kept.
    (mem / demo.MARKER).unlink()
    (mem / "step_1" / "partial.tmp").write_text("left over")
    calls.clear()
    demo.build_demo(root, scale=SCALE, progress=lambda done, total: calls.append((done, total)))
    assert grok_weights.stat().st_mtime_ns == grok_mtime
    assert mem_weights.stat().st_mtime_ns != mem_mtime
    assert not (mem / "step_1" / "partial.tmp").exists()
    assert demo.is_complete(mem, demo.DEMO_RUNS["memorizing"].scaled(SCALE))
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)  # monotone progress

    # A marker for another config counts as incomplete too.
    assert not demo.is_complete(mem, demo.DEMO_RUNS["memorizing"].scaled(0.1))


def test_train_run_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a demo run"):
        demo.train_run(demo.DemoConfig(steps=1, warmup_steps=0), tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_marker_from_another_demo_version_counts_as_incomplete(tmp_path, monkeypatch):
    cfg = demo.DemoConfig(steps=1, warmup_steps=0)
    (tmp_path / demo.MARKER).write_text(demo._marker_text(cfg))
    assert demo.is_complete(tmp_path, cfg)
    monkeypatch.setattr(demo, "DEMO_VERSION", demo.DEMO_VERSION + 1)
    assert not demo.is_complete(tmp_path, cfg)


def test_unreadable_or_unversioned_markers(tmp_path, monkeypatch):
    cfg = demo.DemoConfig(steps=1, warmup_steps=0)
    (tmp_path / demo.MARKER).write_text("half written {")
    assert not demo.is_complete(tmp_path, cfg)
    # Markers written before the demo had versions hold the bare config: version 1.
    (tmp_path / demo.MARKER).write_text(json.dumps(dataclasses.asdict(cfg)))
    monkeypatch.setattr(demo, "DEMO_VERSION", 1)
    assert demo.is_complete(tmp_path, cfg)
    monkeypatch.setattr(demo, "DEMO_VERSION", 2)
    assert not demo.is_complete(tmp_path, cfg)
