"""How many Hessian-vector products the top Hessian eigenvalue needs: power iteration against Lanczos.

The product is the whole cost of ``hessian_top_eigenvalue`` (4.7 min each at Pythia-160m size on a
2-core CPU, README Benchmarks), so the methods are compared by products, not seconds. Models:

- demo checkpoints (``data/demo/<run>/step_*``, OLMoE): loaded, probed and batched as a job does it
  (``analysis.jobs.metric_once``: the bundled modarith probe set, 2 batches of 16 x up to 64 tokens,
  float32); the reference is Lanczos with full reorthogonalisation run to a residual of 1e-6.
- a tiny float64 OLMoE (1,272 parameters, several initialisations) whose Hessian is formed column by
  column: the reference is its exact largest eigenvalue (``torch.linalg.eigvalsh``).

For every model, method and tol (1e-2, 1e-3), with a cap high enough not to bind: the products the
metric took, whether it converged, its relative error against the reference and whether the residual
bound covers the distance to the TOP eigenvalue (|estimate - reference| <= residual |estimate| + the
reference's own bound). A residual certifies closeness to some eigenvalue; "covers top" False on a
converged row means the method settled on another one (power iteration's shifted phase can stop in
the bulk of the spectrum near 0). Lanczos runs in both modes: full reorthogonalisation (``basis_mb``
large) and the three-term recurrence (``basis_mb=0``). Then the project default
(``HessianEigenConfig()``) against the former default (power iteration, max_iter 100, tol 1e-3) on
the same models in this process, with the median ratio of their products. Medians are over all
rows of a group (demo checkpoints, tiny models with their start seeds) and over both.

With ``--device cuda`` every metric call runs on a GPU (the models are moved there after their
references are computed on the CPU): the products it takes should not depend on the device.

    python -m bench.eigen_convergence [--steps 8] [--tiny 4] [--seeds 3] [--threads 1] [--device cpu] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from analysis.metrics.common import Batch, lm_loss
from analysis.metrics.flatness import HessianEigenConfig, hessian_top_eigenvalue
from bench.common import describe_device

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "data" / "demo"
PROBES = ROOT / "data" / "probes" / "modarith"
TOLS = (1e-2, 1e-3)
BIG = 1e12  # basis_mb that any basis fits: full reorthogonalisation
# Caps that do not bind at these tolerances (power iteration's second phase gets its own cap).
CAPS = {"power": 1000, "lanczos": 300}
# The former default: power iteration, up to 100 products per phase, tol 1e-3.
BASELINE = HessianEigenConfig(method="power", max_iter=100, tol=1e-3)
METHODS: dict[str, HessianEigenConfig] = {
    "power": HessianEigenConfig(method="power", max_iter=CAPS["power"]),
    "lanczos full": HessianEigenConfig(method="lanczos", max_iter=CAPS["lanczos"], basis_mb=BIG),
    "lanczos 3-term": HessianEigenConfig(method="lanczos", max_iter=CAPS["lanczos"], basis_mb=0),
}


@dataclass
class Model:
    name: str
    group: str  # "demo" or "tiny (exact)": the summary gives medians per group and over both
    model: nn.Module
    batches: list[Batch]
    reference: float
    reference_bound: float  # |reference - true| is at most this
    loss_fn: Callable = lm_loss


def demo_model(folder: Path, device: torch.device) -> Model:
    """A demo checkpoint as a job computes a flatness metric on it, with its reference eigenvalue.

    The checkpoint is loaded on ``device`` and the reference computed there too (forming its Hessian
    is out of reach; the reference is a tight Lanczos run)."""
    from analysis.evals.heldout import load_probe_set
    from analysis.jobs.kinds import probe_batches
    from analysis.jobs.precision import metric_purpose
    from analysis.jobs.spec import JobSpec
    from analysis.models import compute_dtype_for, load_model, pad_token_id, stored_dtype

    name = "hessian_top_eigenvalue"
    dtype = compute_dtype_for(device, stored_dtype(folder), metric_purpose(name))
    model, tokenizer = load_model(folder, device=device, dtype=dtype, lazy_tokenizer=True)
    probe = load_probe_set(PROBES, tokenizer, 64, max_samples=256)
    spec = JobSpec(run="-", metrics=(name,), batch_size=16, metric_batches=2, data=str(PROBES))
    batches = probe_batches(probe, spec, pad_token_id(model))
    config = HessianEigenConfig(max_iter=CAPS["lanczos"], tol=1e-6, basis_mb=BIG)
    ref = hessian_top_eigenvalue(model, batches, config, device=device)
    bound = ref.residual * abs(ref.value)
    return Model(f"{folder.parent.name}/{folder.name}", "demo", model, batches, ref.value, bound)


def tiny_model(seed: int, device: torch.device) -> Model:
    """A float64 OLMoE of 1,272 parameters on two small batches, and the exact top eigenvalue of its Hessian.

    The Hessian is formed on the CPU; the model is then moved to ``device``, where the metric runs."""
    from transformers import OlmoeForCausalLM

    from analysis.models import tiny_moe_config

    vocab = 12
    torch.manual_seed(seed)
    config = tiny_moe_config(vocab, hidden_size=8, num_layers=1, num_experts=2, top_k=1, num_heads=2, max_positions=16)
    config._experts_implementation = "eager"  # grouped_mm has no float64 kernel
    model = OlmoeForCausalLM(config).to(torch.float64).eval()
    with torch.no_grad():  # the router starts at zero: give it weights so routing varies by token
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0.0, 0.5)
    gen = torch.Generator().manual_seed(100 + seed)
    batches: list[Batch] = []
    for rows, cols in ((3, 6), (2, 5)):
        ids = torch.randint(3, vocab, (rows, cols), generator=gen)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    top = float(torch.linalg.eigvalsh(formed_hessian(model, batches))[-1])
    return Model(f"tiny OLMoE init {seed}", "tiny (exact)", model.to(device), batches, top, 0.0)


def formed_hessian(model: nn.Module, batches: Sequence[Batch]) -> torch.Tensor:
    """The Hessian of the token-weighted mean loss over ``batches``, formed row by row (float64 models)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    sizes = [p.numel() for _, p in named]
    flat = torch.cat([p.detach().reshape(-1) for _, p in named]).requires_grad_(True)

    def loss(vec: torch.Tensor) -> torch.Tensor:
        pieces = {n: c.view_as(p) for (n, p), c in zip(named, vec.split(sizes), strict=True)}
        total, count = vec.new_zeros(()), 0
        for b in batches:
            # lm_loss returns the batch mean: weight it back to a sum so batches count by their tokens.
            mean, n = lm_loss(_Bound(model, pieces), b)
            total, count = total + mean * n, count + n
        return total / count

    with sdpa_kernel(SDPBackend.MATH):
        (grad,) = torch.autograd.grad(loss(flat), flat, create_graph=True)
        eye = torch.eye(flat.numel(), dtype=flat.dtype)
        rows = [torch.autograd.grad(grad, flat, grad_outputs=eye[i : i + 256], is_grads_batched=True,
                                    retain_graph=True)[0] for i in range(0, flat.numel(), 256)]  # fmt: skip
    hess = torch.cat(rows)
    return 0.5 * (hess + hess.T)


class _Bound(nn.Module):
    """``model`` called with the parameters in ``pieces`` (a functional call that lm_loss can take)."""

    def __init__(self, model: nn.Module, pieces: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.inner = [model]  # a list, so the model is not registered as a submodule
        self.pieces = pieces

    def forward(self, **kwargs):
        from torch.func import functional_call

        return functional_call(self.inner[0], self.pieces, args=(), kwargs=kwargs)


def run(m: Model, config: HessianEigenConfig, seed: int, device: torch.device | str = "cpu") -> dict:
    """One metric call on model ``m``: products, convergence, error against the reference, certificate."""
    start = time.perf_counter()
    res = hessian_top_eigenvalue(m.model, m.batches, config, seed=seed, loss_fn=m.loss_fn, device=device)
    error = abs(res.value - m.reference)
    bound = (res.residual or 0.0) * abs(res.value) + m.reference_bound
    return {
        "model": m.name,
        "group": m.group,
        "seed": seed,
        "products": res.iterations,
        "converged": res.converged,
        "value": res.value,
        "rel_error": error / abs(m.reference),
        "residual": res.residual,
        "covered": error <= bound,
        "mode": res.extra.get("reorthogonalisation", "-"),
        "seconds": time.perf_counter() - start,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="checkpoints per demo run, evenly spread (0: none)")
    parser.add_argument("--runs", default="grokking,memorizing")
    parser.add_argument("--tiny", type=int, default=4, help="tiny exact-Hessian models (initialisations)")
    parser.add_argument("--seeds", type=int, default=3, help="start vectors per tiny model")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="where the metric runs: cpu, cuda, cuda:N")
    parser.add_argument("--json", help="also write every row here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"on {describe_device(device)}", flush=True)

    models: list[tuple[Model, list[int]]] = []
    for run_name in [r for r in args.runs.split(",") if r] if args.steps else []:
        folders = sorted((DEMO / run_name).glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
        if not folders:
            raise SystemExit(f"{DEMO / run_name}: no step_* checkpoints; train them with `make demo-train` first")
        pick = sorted({round(i * (len(folders) - 1) / max(args.steps - 1, 1)) for i in range(args.steps)})
        for i in pick:
            models.append((demo_model(folders[i], device), [0]))
            print(f"loaded {models[-1][0].name}: reference {models[-1][0].reference:.6g}", flush=True)
    for seed in range(args.tiny):
        models.append((tiny_model(seed, device), list(range(args.seeds))))

    rows: list[dict] = []
    header = "| model | seed | method | tol | products | converged | rel. error | residual | covers top | mode |"
    print(f"\n{header}\n{'| --- ' * 10}|", flush=True)
    for m, seeds in models:
        for seed in seeds:
            configs = [(label, replace(cfg, tol=tol)) for label, cfg in METHODS.items() for tol in TOLS]
            configs += [("default", HessianEigenConfig()), ("former default", BASELINE)]
            for label, cfg in configs:
                row = {"method": label, "tol": cfg.tol, **run(m, cfg, seed, device)}
                rows.append(row)
                print(
                    f"| {m.name} | {seed} | {label} | {cfg.tol:g} | {row['products']} | {row['converged']} | "
                    f"{row['rel_error']:.2e} | {row['residual']:.2e} | {row['covered']} | {row['mode']} |",
                    flush=True,
                )
    summarise(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


def summarise(rows: list[dict]) -> None:
    """Medians of products per group, method and tol, convergence and coverage counts, and the headline ratio."""
    print("\n| models | method | tol | median products | max products | converged | covers top | max rel. error |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    groups = [*dict.fromkeys(r["group"] for r in rows), "all"]
    for group in groups:
        for method, tol in dict.fromkeys((r["method"], r["tol"]) for r in rows):
            mine = [r for r in rows if (r["method"], r["tol"]) == (method, tol) and group in (r["group"], "all")]
            print(
                f"| {group} | {method} | {tol:g} | {statistics.median(r['products'] for r in mine):g} | "
                f"{max(r['products'] for r in mine)} | {sum(r['converged'] for r in mine)}/{len(mine)} | "
                f"{sum(r['covered'] for r in mine)}/{len(mine)} | {max(r['rel_error'] for r in mine):.1e} |"
            )
    ours = [r for r in rows if r["method"] == "default"]
    base = [r for r in rows if r["method"] == "former default"]
    ratios = [b["products"] / o["products"] for o, b in zip(ours, base, strict=True)]
    default = HessianEigenConfig()
    print(
        f"\nproject default ({default.method}, max_iter {default.max_iter}, tol {default.tol:g}, basis_mb "
        f"{default.basis_mb:g}): median {statistics.median(r['products'] for r in ours):g} products, "
        f"{sum(r['converged'] for r in ours)}/{len(ours)} converged; former default (power, max_iter 100, tol 1e-3): "
        f"median {statistics.median(r['products'] for r in base):g} products, "
        f"{sum(r['converged'] for r in base)}/{len(base)} converged; "
        f"ratio former/default products, median over {len(ratios)} runs = {statistics.median(ratios):.2f}x"
    )


if __name__ == "__main__":
    main()
