"""Cost of a Hessian-vector product relative to one gradient of the same batch, on the same model.

The physical floor is about 2x (an HVP is a gradient of a gradient); the target is at most 3x.
Both are timed in this process on the demo-sized OLMoE (CPU) or, with --device cuda, on a GPU.

    python -m bench.hvp [--device cpu] [--hidden 128] [--batch 8] [--seq 32]
"""

from __future__ import annotations

import argparse

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.common import median_time


def main(argv: list[str] | None = None) -> None:
    from transformers import OlmoeForCausalLM

    from analysis.metrics.common import lm_loss
    from analysis.models import tiny_moe_config

    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=32)
    args = parser.parse_args(argv)
    device = torch.device(args.device)

    torch.manual_seed(0)
    config = tiny_moe_config(128, hidden_size=args.hidden, num_layers=args.layers, num_experts=4)
    model = OlmoeForCausalLM(config).to(device).eval()
    params = [p for p in model.parameters() if p.requires_grad]
    ids = torch.randint(4, 128, (args.batch, args.seq), device=device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    v = [torch.randint(0, 2, p.shape, device=device).float() * 2 - 1 for p in params]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def gradient() -> None:
        loss, _ = lm_loss(model, batch)
        torch.autograd.grad(loss, params)
        sync()

    def hvp() -> None:
        with sdpa_kernel(SDPBackend.MATH):
            loss, _ = lm_loss(model, batch)
            grads = torch.autograd.grad(loss, params, create_graph=True)
            dot = sum((g * u).sum() for g, u in zip(grads, v, strict=True))
            torch.autograd.grad(dot, params)
        sync()

    n_params = sum(p.numel() for p in params)
    grad_t = median_time(gradient, repeats=9, warmup=2)
    hvp_t = median_time(hvp, repeats=9, warmup=2)
    print(
        f"HVP vs gradient ({n_params / 1e6:.2f}M params, batch {args.batch}x{args.seq}, {device}): "
        f"gradient {grad_t * 1e3:.1f} ms, HVP {hvp_t * 1e3:.1f} ms (medians of 9), "
        f"HVP/gradient = {hvp_t / grad_t:.2f}x (target <= 3x, floor ~2x)"
    )


if __name__ == "__main__":
    main()
