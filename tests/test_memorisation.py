"""Memorisation groups and per-sample flips: hand-made tables, and the job runner on tiny real checkpoints."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from analysis import memorisation as mem
from analysis import samples as sm
from analysis.jobs import JobSpec, run_job, submit
from analysis.metrics import pathways
from analysis.metrics.pathways import levenshtein
from analysis.store import Store
from tests.test_jobs import run_dir, store  # noqa: F401  (fixtures: four tiny OLMoE checkpoints)


def test_sample_losses_score_the_last_tokens_only():
    nan = math.nan
    nll = np.array([[1.0, 2.0, 3.0, nan], [4.0, 5.0, nan, nan], [6.0, nan, nan, nan]])
    loss, n = mem.sample_losses(nll, answer_tokens=0)
    assert loss.tolist() == [2.0, 4.5, 6.0] and n.tolist() == [3, 2, 1]
    loss, n = mem.sample_losses(nll, answer_tokens=1)
    assert loss.tolist() == [3.0, 5.0, 6.0] and n.tolist() == [1, 1, 1]
    loss, n = mem.sample_losses(nll, answer_tokens=2)
    assert loss.tolist() == [2.5, 4.5, 6.0] and n.tolist() == [2, 2, 1]


def _rows(losses: dict[int, list[float]], paths: dict[int, list[str]]) -> pd.DataFrame:
    rows = []
    for step, values in losses.items():
        for i, value in enumerate(values):
            record = {"pathway": paths[step][i], "consistency": 0.1 * step + i, "consistency_normalized": 0.5}
            rows.append((step, "h", str(i), value, json.dumps(record)))
    return pd.DataFrame(rows, columns=["step", "params_hash", "sample_id", "value", "record"])


def test_memorisation_steps_groups_and_group_trends():
    # Sample 0 learnt at step 2, sample 1 at 3, sample 2 at 2 but forgotten at 4, sample 3 never.
    losses = {
        1: [3.0, 3.0, 3.0, 3.0],
        2: [0.05, 2.0, 0.05, 3.0],
        3: [0.04, 0.06, 0.05, 3.0],
        4: [0.03, 0.05, 2.0, 3.0],
    }
    paths = {s: ["1,2-3", "1-3", "2,1-3,4", "5-6"] for s in losses}
    table = mem.memorisation_table(_rows(losses, paths), eps=0.1, delta=0.05)
    assert table.first_step.tolist() == [2, 3, mem.NEVER, mem.NEVER]
    groups = mem.memorisation_groups(table, n_groups=2)
    assert {k: v.tolist() for k, v in groups.items()} == {
        "memorised 2": [0],
        "memorised 3": [1],
        "never memorised": [2, 3],
    }
    trends = mem.group_trends(table, groups)
    never = trends[(trends["group"] == "never memorised") & (trends["metric"] == "pathway_distance")]
    assert never["value"].tolist() == [float(levenshtein("2,1-3,4", "5-6"))] * 4
    cons = trends[(trends["group"] == "memorised 3") & (trends["metric"] == "pathway_consistency")]
    assert cons["value"].tolist() == pytest.approx([0.1 * s + 1 for s in (1, 2, 3, 4)])
    loss = trends[(trends["group"] == "never memorised") & (trends["metric"] == "sample_loss")]
    assert loss["value"].tolist() == pytest.approx([3.0, (0.05 + 3) / 2, (0.05 + 3) / 2, (2.0 + 3) / 2])
    share = mem.memorised_fraction(table)
    assert share["value"].tolist() == [0.0, 0.25, 0.5, 0.5]


def test_memorisation_table_refuses_empty_or_malformed_rows():
    with pytest.raises(ValueError, match="memorisation"):
        mem.memorisation_table(pd.DataFrame(columns=["step", "sample_id", "value", "record"]))
    with pytest.raises(ValueError, match="columns"):
        mem.memorisation_table(pd.DataFrame({"step": [1]}))


def test_flip_summary_statuses():
    # Items over 4 checkpoints: learnt at 30, always right, never right, forgotten, unstable.
    states = {"0": [0, 0, 1, 1], "1": [1, 1, 1, 1], "2": [0, 0, 0, 0], "3": [0, 1, 1, 0], "4": [1, 0, 0, 1]}
    steps = [10, 20, 30, 40]
    rows = pd.DataFrame(
        [
            (s, "h", sid, float(v), json.dumps({"prompt": f"q{sid}", "target": "t", "response": f"r{s}"}))
            for sid, vals in states.items()
            for s, v in zip(steps, vals, strict=True)
        ],
        columns=["step", "params_hash", "sample_id", "value", "record"],
    )
    summary = sm.flip_summary(rows).set_index("sample_id")
    assert summary["status"].to_dict() == {
        "0": "learnt",
        "1": "always right",
        "2": "never right",
        "3": "forgotten",
        "4": "unstable",
    }
    assert summary.loc["0", "learnt_at"] == 30 and summary.loc["4", "learnt_at"] == 40
    assert summary.loc["1", "learnt_at"] == 10 and math.isnan(summary.loc["3", "learnt_at"])
    assert summary["flips"].to_dict() == {"0": 1, "1": 0, "2": 0, "3": 2, "4": 2}
    assert summary.loc["3", "prompt"] == "q3" and summary.loc["3", "response"] == "r40"  # the last checkpoint's
    per_step = sm.learnt_per_step(summary.reset_index(), steps)
    assert per_step["learnt"].tolist() == [0, 0, 1, 1] and per_step["cumulative"].tolist() == [0, 0, 1, 2]
    # A second parameter set measured at fewer checkpoints is ignored.
    other = rows.iloc[:2].assign(params_hash="other", value=1.0)
    assert (
        sm.flip_summary(pd.concat([rows, other])).set_index("sample_id")["status"].to_dict()
        == summary["status"].to_dict()
    )


@pytest.mark.slow
def test_runner_stores_memorisation_rows_and_reads_routing_once(store: Store, run_dir, monkeypatch):  # noqa: F811
    calls = []
    real = pathways.routing_profile

    def counting(*args, **kwargs):
        calls.append(kwargs.get("keep_nll", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(pathways, "routing_profile", counting)
    routing = ("pathway_distance", "pathway_consistency", "routing_entropy", "expert_load")
    spec = JobSpec(
        run="tiny",
        metrics=("memorisation", *routing),
        data=str(run_dir.parent / "probe.jsonl"),
        metric_params={"memorisation": {"answer_tokens": "1"}},
    )
    report = run_job(store, submit(store, spec))
    assert not report.failed and report.computed == 4 * (1 + len(routing))
    # Per checkpoint: one pass for the four routing metrics, one for the memorisation rows.
    assert calls.count(False) == 4 and calls.count(True) == 4

    # The stored routing metrics equal the metrics computed directly on the same checkpoint.
    from analysis.evals.heldout import load_probe_set
    from analysis.jobs.kinds import probe_batches
    from analysis.jobs.runner import _load
    from analysis.metrics.registry import compute

    results = store.results("tiny").set_index(["step", "metric"])
    model, tok = _load(str(run_dir / "step_20"), spec, False)
    batches = probe_batches(load_probe_set(spec.data, tok, spec.max_length, max_samples=spec.max_samples), spec)
    for name in routing:
        direct = compute(name, model, batches, seed=spec.seed)
        assert results.loc[(20, name), "value"] == pytest.approx(direct.value, rel=1e-12)

    # Memorisation rows: one per probe sample and checkpoint, loss of the answer token.
    rows = store.sample_results("tiny", "probe/sample_loss")
    assert len(rows) == 4 * 12 and sorted(rows["step"].unique()) == [10, 20, 40, 80]
    record = json.loads(rows["record"].iloc[0])
    assert set(record) == {"loss", "scored_tokens", "pathway", "consistency", "consistency_normalized"}
    assert record["scored_tokens"] == 1 and record["loss"] == pytest.approx(rows["value"].iloc[0])
    # Checked by hand: the answer token's NLL from the model's own logits.
    ids = tok.get()(f"{0} + {0} = {0}")["input_ids"]  # _load's tokenizer loads when asked
    import torch

    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    want = -torch.log_softmax(logits[-2].double(), -1)[ids[-1]].item()
    got = rows[(rows["step"] == 20) & (rows["sample_id"] == "0")]["value"].item()
    assert got == pytest.approx(want, rel=1e-5)
    table = mem.load_memorisation(store, "tiny", "probe", eps=100.0, delta=100.0)
    assert table.loss.shape == (4, 12) and (table.first_step == 10).all()  # everything "memorised" at eps=100

    # A second run computes nothing.
    again = run_job(store, submit(store, spec))
    assert again.computed == 0 and again.cached == 4 * (1 + len(routing))
