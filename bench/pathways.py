"""Cost of the pathway metrics relative to the forward pass that produced the router logits.

The target is that the pathway metrics cost at most 0.3x that forward pass. Both are timed
in this process on the demo-sized OLMoE (random init) over the same random sequences, on
the CPU or, with --device cuda, on a GPU:

- forward: ``model(..., output_router_logits=True)`` over every batch, no grad;
- profile: :func:`routing_profile`, that forward plus the per-sample routing statistics;
  "extraction" is its time minus the forward's, and is also timed alone (the softmax,
  masking and per-sample statistics on router logits captured beforehand), because the
  difference of two medians is noisier than the part itself on a shared CPU; the ratio
  counts the larger of the two;
- metrics: the group functions on the profile (both pathway distances, raw and
  normalised consistency, routing entropy, expert load), which never run the model.

    python -m bench.pathways [--device cpu] [--samples 2000] [--seq 8] [--batch 250] [--threads 1]

The metrics run on one thread (rapidfuzz with workers=1; NumPy without products large
enough for a threaded BLAS), so by default the forward runs on one CPU thread too: a
per-core comparison. On a shared CPU, extra torch threads oversubscribe the cores and can
slow the forward several-fold, which would flatter the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median wall time of each function, the functions taking turns within every repeat.

    Taking turns keeps a change in machine load (a shared CPU) from landing on one
    function's timings only, which would bias the ratios.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv: list[str] | None = None) -> None:
    from transformers import OlmoeForCausalLM

    from analysis.metrics import pathways
    from analysis.models import tiny_moe_config

    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--seq", type=int, default=8, help="mean sequence length; lengths vary by +-2")
    parser.add_argument("--batch", type=int, default=250)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads; 0 keeps torch's default")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    config = tiny_moe_config(128, hidden_size=128, num_layers=2, num_experts=8)
    model = OlmoeForCausalLM(config).to(device).eval()
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(max(args.seq - 2, 2), args.seq + 3, (args.samples,), generator=gen)
    ids = torch.randint(4, 128, (args.samples, int(lengths.max())), generator=gen)
    mask = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()  # right padding
    batches = [
        {"input_ids": ids[i : i + args.batch].to(device), "attention_mask": mask[i : i + args.batch].to(device)}
        for i in range(0, args.samples, args.batch)
    ]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    @torch.no_grad()
    def forward() -> None:
        for b in batches:
            ids, mask = b["input_ids"], b["attention_mask"]
            model(input_ids=ids, attention_mask=mask, output_router_logits=True, use_cache=False)
        sync()

    def profile() -> pathways.RoutingProfile:
        out = pathways.routing_profile(model, batches, device=device)
        sync()
        return out

    prof = profile()

    # The extraction alone: what routing_profile does with each batch's router logits after the forward.
    from analysis.metrics.pathways.routing import _router_probs, _sample_statistics

    with torch.no_grad():
        captured = [
            (model(**b, output_router_logits=True, use_cache=False).router_logits, b["attention_mask"]) for b in batches
        ]

    def extraction() -> None:
        parts = [
            _sample_statistics(_router_probs(logits, m, "olmoe"), m, config.num_experts_per_tok, first=0)
            for logits, m in captured
        ]
        for k in range(4):
            torch.cat([p[k] for p in parts]).cpu().numpy()
        sync()

    metrics = {
        "pathway_distance": lambda: pathways.group_pathway_distance(prof),
        "pathway_distance_chars": lambda: pathways.group_pathway_distance(prof, chars=True),
        "pathway_consistency": lambda: pathways.group_pathway_consistency(prof),
        "pathway_consistency_normalized": lambda: pathways.group_pathway_consistency(prof, normalized=True),
        "routing_entropy": lambda: pathways.group_routing_entropy(prof),
        "expert_load": lambda: pathways.group_expert_load(prof),
    }
    # The baseline for the distances: the project's own NumPy kernel (the tests' reference) on the same pairs.
    paths = pathways.pathways_from_weights(prof.weights, 0.7)
    seqs = [pathways.pathway_tokens(p, separator=prof.weights.shape[-1]) for p in paths]
    uniq = list(dict.fromkeys(seqs))
    table, lengths = pathways._pad(uniq, -1)
    i, j = np.triu_indices(len(uniq), k=1)

    def numpy_kernel() -> None:
        pathways.levenshtein_pairs(table, lengths, i, table, lengths, j)

    def rapidfuzz_kernel() -> None:
        pathways.mean_pairwise_distance(seqs)

    reps = args.repeats
    kernels = interleaved_medians({"numpy": numpy_kernel, "rapidfuzz": rapidfuzz_kernel}, repeats=reps)
    times = interleaved_medians(
        {"forward": forward, "profile": profile, "extraction": extraction, **metrics}, repeats=reps
    )
    forward_t, profile_t, alone_t = times.pop("forward"), times.pop("profile"), times.pop("extraction")
    group_t = sum(times.values())
    extraction_t = max(profile_t - forward_t, alone_t)
    distance = metrics["pathway_distance"]()
    pairs = f"{distance.extra['n_pairs']:,} pairs, {'exact' if distance.extra['exact'] else 'sampled'}"

    print(
        f"pathway metrics vs forward ({args.samples} samples of length ~{args.seq}, batch {args.batch}, "
        f"{config.num_experts} experts x {config.num_hidden_layers} layers, {device}, "
        f"{torch.get_num_threads()} threads; medians of {reps}):"
    )
    print(f"  forward with router logits {forward_t * 1e3:.1f} ms; routing_profile {profile_t * 1e3:.1f} ms")
    print(
        f"  profile extraction: routing_profile - forward {(profile_t - forward_t) * 1e3:.1f} ms, "
        f"timed alone {alone_t * 1e3:.1f} ms ({alone_t / forward_t:.3f}x)"
    )
    for name, t in times.items():
        note = f" ({pairs})" if name.startswith("pathway_distance") else ""
        print(f"  {name}: {t * 1e3:.1f} ms{note}")
    print(
        f"  all {len(i):,} distinct pairs' distances: NumPy kernel {kernels['numpy'] * 1e3:.1f} ms, rapidfuzz "
        f"{kernels['rapidfuzz'] * 1e3:.1f} ms (ratio {kernels['numpy'] / kernels['rapidfuzz']:.1f}x)"
    )
    print(
        f"  metrics {group_t * 1e3:.1f} ms; metrics/forward = {group_t / forward_t:.2f}x; "
        f"(metrics + profile extraction {extraction_t * 1e3:.1f} ms)/forward = "
        f"{(group_t + extraction_t) / forward_t:.2f}x (target <= 0.3x)"
    )


if __name__ == "__main__":
    main()
