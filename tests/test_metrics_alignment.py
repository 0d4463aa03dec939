"""Gradient alignment against independent computations: per-domain gradients of a tiny OLMoE
taken by hand, a linear model whose domains' gradients are orthogonal by construction, and
the half-split ceiling reproduced from the same seeded permutations."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from analysis.jobs.kinds import probe_batches
from analysis.jobs.spec import JobSpec
from analysis.metrics.alignment import (
    GradientAlignmentConfig,
    alignment_matrix,
    domain_gradients,
    gradient_alignment,
)
from analysis.metrics.common import cpu_generator, select_params
from analysis.metrics.registry import compute, get_metric, make_config
from analysis.models import tiny_moe_config

VOCAB = 12


# Tiny tensors: one intra-op thread (the fixture in conftest.py says why).
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_olmoe(dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Module:
    from transformers import OlmoeForCausalLM

    torch.manual_seed(seed)
    config = tiny_moe_config(VOCAB, hidden_size=8, num_layers=1, num_experts=2, top_k=1, num_heads=2, max_positions=16)
    config._experts_implementation = "eager"  # grouped_mm has no float64 kernel
    model = OlmoeForCausalLM(config).to(dtype).eval()
    with torch.no_grad():  # the router starts at zero: give it weights so routing varies by token
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0.0, 0.5)
    return model


def mixed_batches() -> list[dict[str, torch.Tensor]]:
    """Three domains spread over two batches that mix them, with right padding."""
    gen = torch.Generator().manual_seed(5)
    first = torch.randint(3, VOCAB, (5, 7), generator=gen)
    mask = torch.ones_like(first)
    mask[1, 5:] = 0
    mask[3, 4:] = 0
    second = torch.randint(3, VOCAB, (4, 6), generator=gen)
    return [
        {"input_ids": first, "attention_mask": mask, "domain_id": torch.tensor([0, 1, 0, 2, 1])},
        {"input_ids": second, "attention_mask": torch.ones_like(second), "domain_id": torch.tensor([2, 0, 1, 2])},
    ]


def hand_gradient(model: nn.Module, rows: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Flat gradient of the mean next-token NLL over all ``rows`` (ids, mask), one forward."""
    width = max(len(ids) for ids, _ in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, (x, m) in enumerate(rows):
        ids[i, : len(x)], mask[i, : len(m)] = x, m
    params = list(model.parameters())
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
    nll = -torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
    keep = (mask[:, :-1] * mask[:, 1:]).to(nll.dtype)
    loss = (nll * keep).sum() / keep.sum()
    grads = torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)
    return torch.cat([g.reshape(-1) for g in grads])


def rows_of(batches: list[dict], domain: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [
        (b["input_ids"][r], b["attention_mask"][r])
        for b in batches
        for r in range(len(b["domain_id"]))
        if int(b["domain_id"][r]) == domain
    ]


def test_matrix_matches_gradients_taken_by_hand(device):
    model = tiny_olmoe()
    batches = mixed_batches()
    # The hand gradients on the CPU; the metric on the device under test.
    expected = {d: hand_gradient(model, rows_of(batches, d)) for d in (0, 1, 2)}
    model.to(device)
    params = [p for _, p in select_params(model, "all")]
    grads = domain_gradients(model, batches, params, device)
    assert sorted(grads) == [0, 1, 2]
    for d in (0, 1, 2):
        got = torch.cat([g.reshape(-1) for g in grads[d]]).cpu()
        # OLMoE's RMSNorm computes in float32 even in a float64 model, and the hand computation
        # batches the rows differently: agreement is to float32 rounding, not float64.
        torch.testing.assert_close(got, expected[d], rtol=1e-5, atol=1e-6 * float(expected[d].abs().max()))
    result = gradient_alignment(model, batches, GradientAlignmentConfig(n_splits=3), seed=2, device=device)
    assert result.extra["domains"] == [0, 1, 2]
    assert result.extra["n_samples"] == [3, 3, 3]
    pairs = []
    for i in range(3):
        for j in range(3):
            cos = float(nn.functional.cosine_similarity(expected[i], expected[j], dim=0))
            if i != j:
                assert result.extra["matrix"][i][j] == pytest.approx(cos, abs=1e-6)
                if i < j:
                    pairs.append(cos)
    matrix = alignment_matrix(grads)
    assert matrix[0, 1] == matrix[1, 0] == pytest.approx(result.extra["matrix"][0][1], abs=1e-6)
    assert matrix[2, 2] == pytest.approx(1.0, abs=1e-12)
    assert result.value == pytest.approx(sum(pairs) / 3, abs=1e-6)
    assert result.per_probe == pytest.approx(tuple(pairs), abs=1e-6)
    assert result.stderr is None and result.n == 9 and result.extra["single_domain"] is False
    diagonal = [result.extra["matrix"][d][d] for d in range(3)]
    assert result.extra["ceiling"] == pytest.approx(sum(diagonal) / 3)
    assert all(-1.0 <= c <= 1.0 for c in diagonal)
    assert result.extra["normalized"] == (
        pytest.approx(result.value / result.extra["ceiling"]) if result.extra["ceiling"] > 0 else None
    )


def test_identical_data_in_two_domains_has_cosine_one(device):
    model = tiny_olmoe(torch.float32).to(device)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (4, 8), generator=gen)
    batches = [
        {"input_ids": ids, "attention_mask": torch.ones_like(ids), "domain_id": torch.zeros(4, dtype=torch.long)},
        {"input_ids": ids, "attention_mask": torch.ones_like(ids), "domain_id": torch.ones(4, dtype=torch.long)},
    ]
    result = compute("gradient_alignment", model, batches, {"n_splits": 2}, device=device)
    assert result.value == pytest.approx(1.0, abs=1e-6)
    assert result.extra["matrix"][0][1] == pytest.approx(1.0, abs=1e-6)
    # The same permutation is not drawn twice, but each domain's ceiling is a cosine: at most 1.
    assert all(result.extra["matrix"][d][d] <= 1.0 for d in (0, 1))
    assert result.extra["version"] == "1"


# --- a linear model: gradients known in closed form ------------------------------------------------


class Linear(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.linspace(-1.0, 1.0, dim, dtype=torch.float64))


def squared_error(model: nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
    """0.5 * mean over samples of (x . w - y)^2; every sample counts once."""
    return 0.5 * ((batch["x"] @ model.w - batch["y"]) ** 2).mean(), len(batch["y"])


def closed_form(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((x @ w - y)[:, None] * x).mean(dim=0)


def linear_data(n: int = 6, dim: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Domain 0 lives on the first half of the coordinates, domain 1 on the second half."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * n, dim, generator=gen, dtype=torch.float64)
    x[:n, dim // 2 :] = 0
    x[n:, : dim // 2] = 0
    y = torch.randn(2 * n, generator=gen, dtype=torch.float64)
    domain = torch.tensor([0] * n + [1] * n)
    return x, y, domain


def test_orthogonal_domains_give_zero_and_the_ceiling_matches_its_splits():
    x, y, domain = linear_data()
    model = Linear(x.shape[1])
    # Batches that interleave the domains, so every half is gathered from both batches.
    order = torch.tensor([0, 6, 1, 7, 2, 8, 3, 9, 4, 10, 5, 11])
    x, y, domain = x[order], y[order], domain[order]
    batches = [{"x": x[:5], "y": y[:5], "domain_id": domain[:5]}, {"x": x[5:], "y": y[5:], "domain_id": domain[5:]}]
    n_splits, seed = 3, 4
    config = GradientAlignmentConfig(n_splits=n_splits)
    result = gradient_alignment(model, batches, config, seed=seed, loss_fn=squared_error)
    assert result.value == 0.0 and result.extra["matrix"][0][1] == 0.0

    # The ceiling from the same permutations: domains ascending, n_splits draws each.
    w = model.w.detach()
    gen = cpu_generator(seed)
    ceilings = []
    for d in (0, 1):
        xd, yd = x[domain == d], y[domain == d]
        cosines = []
        for _ in range(n_splits):
            perm = torch.randperm(len(yd), generator=gen)
            a, b = perm[: len(yd) // 2], perm[len(yd) // 2 :]
            ga, gb = closed_form(w, xd[a], yd[a]), closed_form(w, xd[b], yd[b])
            cosines.append(float(nn.functional.cosine_similarity(ga, gb, dim=0)))
        ceilings.append(sum(cosines) / n_splits)
        assert result.extra["matrix"][d][d] == pytest.approx(ceilings[-1], abs=1e-12)
    assert result.extra["ceiling"] == pytest.approx(sum(ceilings) / 2, abs=1e-12)
    assert all(c <= 1.0 for c in ceilings)
    assert result.extra["normalized"] == (0.0 if result.extra["ceiling"] > 0 else None)


def test_partly_aligned_domains_give_the_closed_form_cosine():
    x, y, domain = linear_data(seed=3)
    x[6:, :3] = x[:6, :3]  # domain 1 now shares domain 0's first coordinates
    model = Linear(x.shape[1])
    batches = [{"x": x, "y": y, "domain_id": domain}]
    result = gradient_alignment(model, batches, GradientAlignmentConfig(n_splits=1), loss_fn=squared_error)
    w = model.w.detach()
    g0, g1 = closed_form(w, x[:6], y[:6]), closed_form(w, x[6:], y[6:])
    assert result.value == pytest.approx(float(nn.functional.cosine_similarity(g0, g1, dim=0)), abs=1e-12)
    assert 0.0 < abs(result.value) < 1.0


def test_one_domain_reports_its_ceiling():
    x, y, _ = linear_data(n=8)
    model = Linear(x.shape[1])
    batches = [{"x": x[:8], "y": y[:8], "domain_id": torch.zeros(8, dtype=torch.long)}]
    result = gradient_alignment(model, batches, GradientAlignmentConfig(n_splits=5), loss_fn=squared_error)
    assert result.extra["single_domain"] is True and "note" in result.extra
    assert result.value == result.extra["ceiling"] == result.extra["matrix"][0][0]
    assert len(result.per_probe) == 5 and result.value == pytest.approx(sum(result.per_probe) / 5)
    assert result.stderr is not None and result.stderr > 0
    ceiling = result.extra["ceiling"]
    assert ceiling <= 1.0
    if ceiling > 0:
        assert result.extra["normalized"] == pytest.approx(1.0)
        assert result.extra["ceiling_full_size"] == pytest.approx(2 * ceiling / (1 + ceiling))
        assert result.extra["normalized_full_size"] == pytest.approx(ceiling / result.extra["ceiling_full_size"])
    one = [{"x": x[:1], "y": y[:1], "domain_id": torch.zeros(1, dtype=torch.long)}]
    with pytest.raises(ValueError, match="single sample"):
        gradient_alignment(model, one, loss_fn=squared_error)


def test_batches_without_domain_id_are_domain_zero_and_a_lone_sample_has_no_ceiling():
    model = tiny_olmoe(torch.float32)
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(3, VOCAB, (3, 6), generator=gen)
    lone = torch.randint(3, VOCAB, (1, 6), generator=gen)
    batches = [
        {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
        {"input_ids": lone, "attention_mask": torch.ones_like(lone), "domain_id": torch.tensor([7])},
    ]
    result = gradient_alignment(model, batches, GradientAlignmentConfig(n_splits=2))
    assert result.extra["domains"] == [0, 7]
    assert result.extra["matrix"][1][1] is None  # one sample: nothing to split
    assert result.extra["ceiling"] == pytest.approx(result.extra["matrix"][0][0])
    assert result.value == pytest.approx(result.extra["matrix"][0][1])


def test_model_is_left_untouched(device):
    model = tiny_olmoe(torch.float32).to(device)  # float32 on its own device: used in place, not copied
    model.train()
    model.model.embed_tokens.weight.requires_grad_(False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    gradient_alignment(model, mixed_batches(), GradientAlignmentConfig(n_splits=2, subset="layer:0"), device=device)
    assert model.training is True
    for n, p in model.named_parameters():
        assert p.grad is None, n
        assert p.requires_grad == flags[n], n
        assert torch.equal(p.detach(), before[n]), n


def test_low_precision_model_runs_on_a_float32_copy(device):
    model = tiny_olmoe(torch.bfloat16).to(device)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = gradient_alignment(model, mixed_batches(), GradientAlignmentConfig(n_splits=1), device=device)
    assert math.isfinite(result.value) and -1.0 <= result.value <= 1.0
    for n, p in model.named_parameters():
        assert p.dtype == torch.bfloat16 and p.grad is None and torch.equal(p.detach(), before[n]), n


def test_config_and_registry():
    spec = get_metric("gradient_alignment")
    assert (spec.family, spec.version, spec.higher_is_better, spec.needs_moe) == ("alignment", "1", True, False)
    assert make_config("gradient_alignment", {"n_splits": "2", "subset": "module:mlp"}) == GradientAlignmentConfig(
        subset="module:mlp", n_splits=2
    )
    with pytest.raises(ValueError, match="n_splits"):
        make_config("gradient_alignment", {"n_splits": "0"})
    with pytest.raises(ValueError, match="subset"):
        GradientAlignmentConfig(subset="layers")
    with pytest.raises(ValueError, match="domain_id must hold integers"):
        ids = torch.ones(2, 4, dtype=torch.long)
        gradient_alignment(tiny_olmoe(), [{"input_ids": ids, "domain_id": torch.zeros(2)}])


# --- the job runner's probe batches ---------------------------------------------------------------------


def test_probe_batches_keep_domains_apart_and_share_the_budget():
    probe = SimpleNamespace(
        domains={"train": ((3, 4, 5),) * 40, "heldout": ((6, 7),) * 40, "tiny": ((8, 9, 10, 11),) * 3}
    )
    spec = JobSpec(run="-", metrics=("gradient_alignment",), batch_size=8, metric_batches=3)
    batches = probe_batches(probe, spec)
    per_domain = {0: 0, 1: 0, 2: 0}  # heldout, tiny, train in sorted name order
    for b in batches:
        ids = b["domain_id"]
        assert ids.dtype == torch.long and ids.shape == (b["input_ids"].shape[0],)
        assert len(set(ids.tolist())) == 1 and b["input_ids"].shape[0] <= 8
        per_domain[int(ids[0])] += len(ids)
    assert per_domain == {0: 11, 1: 3, 2: 10}  # 24 in all; "tiny" has only 3 to give
    result = gradient_alignment(tiny_olmoe(torch.float32), batches, GradientAlignmentConfig(n_splits=1))
    assert result.extra["domains"] == [0, 1, 2] and result.n == 24
