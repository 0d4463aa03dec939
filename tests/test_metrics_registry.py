"""The metric registry: names, did-you-mean errors, configs from strings, the uniform call."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from analysis.metrics import (
    MetricResult,
    MetricSpec,
    compute,
    get_metric,
    make_config,
    metric_names,
    register,
    registry,
)
from analysis.metrics.flatness import HessianTraceConfig, SamConfig

# Tiny tensors: one intra-op thread (the fixture in conftest.py says why).
pytestmark = pytest.mark.usefixtures("one_thread")


BUILTIN = [
    "hessian_trace",
    "hessian_top_eigenvalue",
    "fisher_trace",
    "adaptive_sharpness",
    "perturbation_sensitivity",
    "sam_sharpness",
    "pathway_distance",
    "pathway_distance_chars",
    "pathway_consistency",
    "pathway_consistency_normalized",
    "routing_entropy",
    "expert_load",
]


def test_builtin_names_and_specs():
    assert set(BUILTIN) <= set(metric_names())
    assert get_metric("hessian_trace").higher_is_better is False
    assert get_metric("pathway_consistency").higher_is_better is True
    assert get_metric("routing_entropy").higher_is_better is None
    assert all(get_metric(n).needs_moe for n in BUILTIN if n.startswith(("pathway", "routing", "expert")))
    assert not any(get_metric(n).needs_moe for n in BUILTIN[:6])
    assert {get_metric(n).family for n in BUILTIN} == {"flatness", "pathways"}


def test_unknown_metric_suggests_the_right_name():
    with pytest.raises(KeyError) as err:
        get_metric("hesian_trace")
    assert err.value.args[0] == "unknown metric 'hesian_trace'; did you mean 'hessian_trace'?"
    with pytest.raises(KeyError) as err:
        get_metric("zzz")
    assert "known metrics: " in err.value.args[0] and "expert_load" in err.value.args[0]


def test_make_config_converts_strings_and_reports_bad_keys():
    config = make_config("hessian_trace", {"n_probes": "8", "subset": "module:mlp"})
    assert config == HessianTraceConfig(n_probes=8, subset="module:mlp")
    assert make_config("hessian_trace", {"n_probes": "1e2"}).n_probes == 100
    assert make_config("hessian_trace", {"n_probes": 3}).n_probes == 3
    assert make_config("sam_sharpness", {"adaptive": "true", "rho": "0.5"}) == SamConfig(rho=0.5, adaptive=True)
    assert make_config("sam_sharpness", {"adaptive": False, "rho": 1}).rho == 1.0
    assert make_config("pathway_distance", {"max_pairs": "0"}).max_pairs == 0
    with pytest.raises(
        ValueError, match="unknown parameter 'n_probe' for metric 'hessian_trace'; did you mean 'n_probes'"
    ):
        make_config("hessian_trace", {"n_probe": "8"})
    with pytest.raises(ValueError, match=r"parameter 'n_probes': expected an integer, got '2\.5'"):
        make_config("hessian_trace", {"n_probes": "2.5"})
    with pytest.raises(ValueError, match="parameter 'adaptive': expected true or false"):
        make_config("sam_sharpness", {"adaptive": "maybe"})
    with pytest.raises(ValueError, match="metric 'hessian_trace': hessian_trace: n_probes must be a positive integer"):
        make_config("hessian_trace", {"n_probes": "0"})
    with pytest.raises(ValueError, match=r"valid parameters: seed$"):
        make_config("routing_entropy", {"threshold": "0.5"})
    with pytest.raises(ValueError, match="method must be 'power' or 'lanczos'"):
        make_config("hessian_top_eigenvalue", {"method": "arnoldi"})
    with pytest.raises(ValueError, match=r"parameter 'basis_mb': expected a number, got '1GB'"):
        make_config("hessian_top_eigenvalue", {"basis_mb": "1GB"})
    with pytest.raises(ValueError, match=r"hessian_top_eigenvalue: basis_mb must be a number >= 0, got -5\.0"):
        make_config("hessian_top_eigenvalue", {"basis_mb": "-5"})
    assert make_config("hessian_top_eigenvalue", {"basis_mb": "0"}).basis_mb == 0.0


@dataclass(frozen=True)
class CountConfig:
    scale: float = 1.0
    label: str | None = None


def count_params(model, batches, config, *, device, seed) -> MetricResult:
    n = sum(p.numel() for p in model.parameters())
    return MetricResult("param_count", config.scale * n, None, 1, params={"scale": config.scale, "seed": seed})


def test_registration_is_open():
    spec = MetricSpec("param_count", "2", "size", None, False, CountConfig, count_params)
    register(spec)
    try:
        with pytest.raises(ValueError, match="already registered"):
            register(spec)
        assert make_config("param_count", {"label": "none"}).label is None
        result = compute("param_count", torch.nn.Linear(2, 3), [], {"scale": "2"}, seed=4)
        assert result.value == 18.0 and result.extra["version"] == "2" and result.params["seed"] == 4
    finally:
        registry._REGISTRY.pop("param_count", None)
    assert "param_count" not in metric_names()


def tiny_model():
    from transformers import OlmoeForCausalLM

    from analysis.models import tiny_moe_config

    torch.manual_seed(0)
    config = tiny_moe_config(12, hidden_size=16, num_layers=2, num_experts=4, top_k=2, num_heads=2, max_positions=16)
    model = OlmoeForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0.0, 1.0)
    return model


SMALL = {
    "hessian_trace": {"n_probes": "2"},
    "hessian_top_eigenvalue": {"max_iter": "5"},
    "fisher_trace": {"n_samples": "2"},
    "adaptive_sharpness": {"n_samples": "2"},
    "perturbation_sensitivity": {"n_samples": "2"},
    "sam_sharpness": {},
    "pathway_distance": {},
    "pathway_distance_chars": {"max_pairs": "2"},
    "pathway_consistency": {},
    "pathway_consistency_normalized": {},
    "routing_entropy": {},
    "expert_load": {},
}


def test_every_builtin_metric_runs_through_compute_and_leaves_the_model_alone():
    model = tiny_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 12, (4, 6), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    batches = [{"input_ids": ids, "attention_mask": mask}]
    for name in BUILTIN:
        result = compute(name, model, batches, SMALL[name], device="cpu", seed=1)
        assert result.name == name
        assert math.isfinite(result.value), name
        assert result.extra["version"] == get_metric(name).version
        assert result.params["seed"] == 1
        again = compute(name, model, batches, SMALL[name], device="cpu", seed=1)
        assert again.value == pytest.approx(result.value, rel=1e-6, abs=1e-9), f"{name} is not reproducible"
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    with pytest.raises(TypeError, match="takes a HessianTraceConfig config, got SamConfig"):
        compute("hessian_trace", model, batches, SamConfig())


def test_results_say_what_their_stderr_covers_and_iterative_ones_whether_they_converged():
    model = tiny_model()
    gen = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(3, 12, (2, 6), generator=gen)} for _ in range(3)]
    for name in ("hessian_trace", "fisher_trace", "adaptive_sharpness", "perturbation_sensitivity"):
        many = compute(name, model, batches, SMALL[name], seed=0)
        assert many.stderr_covers == "batches" and many.dof == 2, name
        assert len(many.extra["per_batch"]) == 3 and many.converged is None, name
        one = compute(name, model, batches[:1], SMALL[name], seed=0)
        assert one.stderr_covers == "probes" and one.dof == 1, name
    eigen = compute("hessian_top_eigenvalue", model, batches, {"max_iter": "2", "tol": "1e-3"}, seed=0)
    # max_iter per phase: a second, shifted phase runs when the first one's estimate is negative.
    assert eigen.converged is False and eigen.iterations in (2, 4) and eigen.residual > 1e-3
    assert compute("sam_sharpness", model, batches, {}).converged is None


def test_runner_stores_converged_for_iterative_metrics_only():
    from analysis.jobs.kinds import UnitContext, get_kind
    from analysis.jobs.spec import Item, JobSpec

    model = tiny_model()
    gen = torch.Generator().manual_seed(2)
    batches = [{"input_ids": torch.randint(3, 12, (2, 6), generator=gen)} for _ in range(2)]
    spec = JobSpec(run="r", metrics=("hessian_top_eigenvalue",))
    ctx = UnitContext(spec, model, None, 10, "fp", "unused", {})
    vars(ctx)["batches"] = batches  # given, so the context never reads a probe file

    def stored(name: str, config: dict):
        item = Item("metric", name, {"config": config, "version": get_metric(name).version})
        rows, _ = get_kind("metric").compute(item, ctx)
        assert len(rows) == 1
        return rows[0]

    capped = stored("hessian_top_eigenvalue", {"max_iter": 2})
    assert capped.converged is False
    done = stored("hessian_top_eigenvalue", {"max_iter": 500, "method": "lanczos", "tol": 1e-2})
    assert done.converged is True
    assert stored("hessian_trace", {"n_probes": 2}).converged is None


def test_eigenvalue_rows_of_former_defaults_are_settings_of_their_own_never_reused():
    from analysis.jobs.kinds import get_kind
    from analysis.jobs.spec import JobSpec
    from analysis.settings import setting_labels
    from analysis.store import params_hash

    (item,) = get_kind("metric").plan(JobSpec(run="r", metrics=("hessian_top_eigenvalue",)), "hessian_top_eigenvalue")
    assert item.params["config"]["method"] == "lanczos" and "basis_mb" in item.params["config"]
    # What earlier versions stored: the former default (power iteration), and the demo's Lanczos settings
    # from before the basis budget existed (always full reorthogonalisation).
    before = {"subset": "all", "tol": 0.001}
    former = {**item.params, "config": {**before, "max_iter": 100, "method": "power"}}
    demo = {**item.params, "config": {**before, "max_iter": 40, "method": "lanczos"}}
    for old in (former, demo):
        assert not item.is_cached({("hessian_top_eigenvalue", params_hash(old))})
    labels = setting_labels({item.params_hash: item.params, params_hash(former): former, params_hash(demo): demo})
    assert "method=power" in labels[params_hash(former)] and "method=power" not in labels[item.params_hash]
    assert "basis_mb unset" in labels[params_hash(demo)] and "basis_mb=1024" in labels[item.params_hash]
    assert len(set(labels.values())) == 3


def test_metric_command_json_prints_the_stderr_scope_interval_and_convergence(tmp_path):
    import json

    from analysis.jobs.metric_once import compute_once
    from analysis.metrics.common import interval
    from tests.factories import save_tiny_checkpoint, sum_texts

    checkpoint = save_tiny_checkpoint(tmp_path / "ckpt")
    data = tmp_path / "probe.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in sum_texts(8)))

    two = compute_once("hessian_trace", checkpoint, data, params=["n_probes=2"], device="cpu", batch_size=4)
    json.dumps(two)  # JSON-ready
    assert two["stderr_covers"] == "batches" and two["dof"] == 1 and "data distribution" in two["stderr_note"]
    assert two["interval_95"] == pytest.approx(list(interval(two["value"], two["stderr"], 1)))
    assert two["interval_95"][1] - two["value"] == pytest.approx(12.706 * two["stderr"], rel=1e-3)
    assert "converged" not in two

    one = compute_once("hessian_trace", checkpoint, data, params=["n_probes=3"], device="cpu", batch_size=8)
    assert one["stderr_covers"] == "probes" and "probe noise only" in one["stderr_note"]

    eigen = compute_once("hessian_top_eigenvalue", checkpoint, data, params=["max_iter=2"], device="cpu")
    assert eigen["converged"] is False and eigen["iterations"] == 2 and eigen["residual"] > 1e-3
    assert eigen["convergence_note"].endswith("; raise max_iter") and eigen["reorthogonalisation"] == "full"
    power = compute_once(
        "hessian_top_eigenvalue", checkpoint, data, params=["max_iter=2", "method=power"], device="cpu"
    )
    assert "raise max_iter or use method=lanczos" in power["convergence_note"] and "reorthogonalisation" not in power
    assert eigen["stderr"] is None and "stderr_covers" not in eigen
