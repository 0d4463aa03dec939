"""Work kinds: the registry both executors use, a unit's typed context, a newly registered kind end to end,
and the targeted job queries the worker polls."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from analysis.jobs import JobSpec, next_job, run_job, submit
from analysis.jobs.kinds import UnitContext, WorkKind, get_kind, kind_for_request, kind_names, register, unregister
from analysis.jobs.runner import LOADS, load_job
from analysis.jobs.spec import Item, plan_items
from analysis.runs.load import load_run
from analysis.store import Store
from tests.test_jobs import run_dir, spec  # noqa: F401  (run_dir is a fixture)


class ParamNorm(WorkKind):
    """A toy kind: the L2 norm of every weight of the checkpoint, one row per checkpoint."""

    name = "param_norm"
    requests = ("param_norm",)

    def plan(self, spec: JobSpec, request: str) -> list[Item]:
        return [Item(self.name, request, {"version": "1"})]

    def produces(self, item: Item, metric: str) -> bool:
        return metric == "param_norm"

    def compute(self, item: Item, ctx: UnitContext, progress=None):
        squares = sum(p.detach().double().pow(2).sum() for p in ctx.model.parameters())
        return [ctx.row(item, "param_norm", float(torch.sqrt(squares)), code_version="1")], []


@pytest.fixture
def param_norm():
    """ParamNorm registered for one test, and gone afterwards (the registry is process-wide)."""
    register(ParamNorm)
    yield get_kind("param_norm")
    unregister("param_norm")


def direct_norm(folder: Path) -> float:
    """The oracle: the weights read straight from the safetensors file, not through the model."""
    tensors = load_file(folder / "model.safetensors")
    return float(torch.sqrt(sum(t.double().pow(2).sum() for t in tensors.values())))


@pytest.mark.slow
def test_a_registered_kind_is_planned_computed_stored_and_then_cached(run_dir: Path, tmp_path: Path, param_norm):  # noqa: F811
    store = Store(tmp_path / "cache.duckdb")
    store.register_run(load_run(run_dir))
    request = JobSpec(run="tiny", steps=(10, 40), metrics=("param_norm", "heldout_loss"), data=spec(run_dir).data)
    assert [it.label for it in plan_items(request)] == ["param_norm:param_norm", "heldout:probe.jsonl"]
    report = run_job(store, submit(store, request))
    assert not report.failed and report.computed == 4
    stored = store.results("tiny").set_index(["step", "metric"])
    for step in (10, 40):
        want = direct_norm(run_dir / f"step_{step}")
        assert stored.loc[(step, "param_norm"), "value"] == pytest.approx(want, rel=1e-9)
    assert stored.loc[(10, "param_norm"), "value"] != stored.loc[(40, "param_norm"), "value"]  # differently seeded
    before = LOADS["count"]
    again = run_job(store, submit(store, request))
    assert again.computed == 0 and again.cached == 4 and LOADS["count"] == before  # produces() found them


@pytest.mark.slow
def test_a_kind_that_fails_fails_its_item_alone(run_dir: Path, tmp_path: Path, param_norm, monkeypatch):  # noqa: F811
    def broken(item, ctx, progress=None):
        raise ValueError("no weights to measure\nsecond line")

    monkeypatch.setattr(param_norm, "compute", broken)
    store = Store(tmp_path / "cache.duckdb")
    store.register_run(load_run(run_dir))
    job = submit(store, spec(run_dir, steps=(10,), tasks=(), metrics=("param_norm", "heldout_loss")))
    report = run_job(store, job)
    assert report.failed == ["step 10: param_norm:param_norm: no weights to measure"]
    assert set(store.results("tiny")["metric"]) == {f"probe/heldout_{x}" for x in ("loss", "perplexity", "bpb")}


def test_unknown_kinds_and_requests_suggest_the_closest_name() -> None:
    with pytest.raises(KeyError, match=r"unknown work kind 'heldot'; did you mean 'heldout'\?"):
        get_kind("heldot")
    with pytest.raises(KeyError, match="unknown work kind 'zzz'; known kinds: finetune, heldout, lm_eval"):
        get_kind("zzz")
    # --metrics names of every kind are suggested, not just the registry's metrics.
    with pytest.raises(KeyError, match=r"unknown metric 'heldout_los'; did you mean 'heldout_loss'\?"):
        kind_for_request("heldout_los")
    with pytest.raises(KeyError, match="unknown metric 'memorization'; did you mean 'memorisation'"):
        plan_items(JobSpec(run="r", metrics=("memorization",)))
    with pytest.raises(KeyError, match="unknown work kind 'gone'"):
        _ = Item("gone", "x", {}).label


def test_a_name_or_request_taken_twice_is_refused_and_the_registry_is_unchanged() -> None:
    before = kind_names()

    class Heldout(ParamNorm):
        name = "heldout"

    class Shadow(ParamNorm):
        name = "shadow"
        requests = ("hessian_trace",)  # already a registry metric

    with pytest.raises(ValueError, match="work kind Heldout: name 'heldout' is already registered; pick another"):
        register(Heldout)
    with pytest.raises(ValueError, match="work kind Shadow: request 'hessian_trace' is already registered"):
        register(Shadow)
    assert kind_names() == before and type(get_kind("heldout")).__name__ == "HeldoutKind"


def test_every_stored_name_has_exactly_one_owner_among_a_jobs_items(run_dir: Path) -> None:  # noqa: F811
    items = plan_items(spec(run_dir, metrics=("heldout_loss", "proxy", "memorisation", "hessian_trace")))
    stored = [
        "sequence_ll/acc,none", "antonyms_mc/p_correct,none", "probe/heldout_loss", "probe/heldout_bpb",
        "antonyms_mc/proxy_ce", "probe/sample_loss", "hessian_trace",
    ]  # fmt: skip
    for metric in stored:
        owners = [it.label for it in items if it.produces(metric)]
        assert len(owners) == 1, (metric, owners)
    assert not any(it.produces("pathway_distance") for it in items)


def test_the_unit_context_reads_the_probe_set_only_when_asked_and_once(run_dir: Path) -> None:  # noqa: F811
    from analysis.models import load_model

    model, tok = load_model(run_dir / "step_10", device="cpu", lazy_tokenizer=True)
    missing = UnitContext(spec(run_dir), model, tok, 10, "fp", str(run_dir / "step_10"), {}, "/nonexistent.jsonl")
    row = missing.row(Item("param_norm", "x", {"a": 1}), "param_norm", 1.5, code_version="1")
    assert (row.run, row.step, row.fingerprint, row.params) == ("tiny", 10, "fp", {"a": 1})  # no probe read
    with pytest.raises(ValueError, match=r"/nonexistent\.jsonl"):
        _ = missing.batches
    ctx = UnitContext(spec(run_dir), model, tok, 10, "fp", str(run_dir / "step_10"), {}, spec(run_dir).data)
    assert ctx.batches is ctx.batches and ctx.probe.n_samples == 12
    assert ctx.routing is ctx.routing and ctx.device == torch.device("cpu")
    with pytest.raises(ValueError, match="no probe data for this unit: pass --data"):
        _ = UnitContext(spec(run_dir), model, tok, 10, "fp", "x", {}).probe


@pytest.mark.slow
def test_targeted_job_queries(tmp_path: Path, run_dir: Path) -> None:  # noqa: F811
    absent = Store(tmp_path / "absent.duckdb")
    assert absent.job(1) is None and absent.job_status(1) is None and absent.open_jobs() == []
    assert not absent.path.exists()  # reading never creates a cache
    store = Store(tmp_path / "cache.duckdb")
    store.register_run(load_run(run_dir))
    first, second, third = (submit(store, spec(run_dir, steps=(s,), tasks=("sequence_ll",))) for s in (10, 20, 40))
    assert JobSpec.from_dict(store.job(second).spec) == spec(run_dir, steps=(20,), tasks=("sequence_ll",))
    assert [j.id for j in store.open_jobs()] == [first, second, third] and next_job(store) == first
    store.set_job(first, "done")
    store.set_job(second, "running", worker_pid=os.getpid())  # this process: an interrupted earlier run
    store.set_job(third, "cancelled")
    assert store.job_status(third) == "cancelled" and store.job(second).worker_pid == os.getpid()
    assert [j.id for j in store.open_jobs()] == [second] and next_job(store) == second
    with pytest.raises(ValueError, match=rf"^no job 99 in {re.escape(str(store.path))}; list jobs with `python"):
        load_job(store, 99)
    assert store.job(99) is None and store.job_status(99) is None
