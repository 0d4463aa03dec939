"""What one checkpoint costs at Pythia-160m size: seconds and peak memory of every metric at its defaults.

A GPT-NeoX with Pythia-160m's shape (hidden 768, 12 layers, 12 heads, vocab 50304, 2048 positions;
162M parameters, random weights, nothing downloaded) is saved in bf16 safetensors, as pretraining
checkpoints are. Each evaluation then runs in a fresh subprocess, as a job would run it: the
checkpoint loaded in the dtype :func:`analysis.models.compute_dtype_for` picks on this machine, the
job's default probe batches (2 batches of 16 x 64 tokens, from a probe of 2 domains x 256 samples),
the metric's registry defaults. Peak memory is the subprocess's ``ru_maxrss`` (torch allocates
outside Python's allocator, so tracemalloc would see almost nothing).

The long metrics would run for hours here, so the full run stops each one after its first
progress ticks (probes, draws, gradients) and extrapolates: the first tick carries the per-batch
setup (a forward and, for the Hessian, the gradient graph), the later ones one unit each, so
``estimate = setups x (first - unit) + n x unit``. The top eigenvalue is not run at all: each of
its products (a Lanczos step, or a power iteration) is one gradient graph and one Hessian-vector
product per batch, which is what the Hessian trace's first tick measures, so at its cap
``estimate = max_iter x batches x first`` (it stops earlier once converged: ``python -m
bench.eigen_convergence`` measures how many products that takes).
``--quick`` (a 2-layer, width-32 model, 32 x 16-token probe samples) runs everything to the end
but the eigenvalue, and prints the extrapolations beside the measured times, which checks the
cost model. Finally, in one subprocess, held-out loss on the same batches with the model as
stored (bf16) against the model upcast to float32, medians of 3 interleaved repeats.

``--device cuda`` runs every evaluation on a GPU (each subprocess loads the checkpoint there; the
rule then computes forward passes in the stored bf16 and gradients in float32) and adds each
subprocess's peak GPU memory (``torch.cuda.max_memory_allocated``); ``--dtype`` overrides the rule
for every evaluation, as a job's --dtype does.

    python -m bench.checkpoint_cost [--quick] [--device cpu] [--dtype NAME] [--json FILE]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import DTYPES, describe_device, sync

# Pythia-160m's shape (EleutherAI/pythia-160m config.json), and the --quick stand-in.
FULL = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
        "vocab_size": 50304, "max_position_embeddings": 2048}  # fmt: skip
QUICK = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
         "vocab_size": 1024, "max_position_embeddings": 128}  # fmt: skip
SAMPLES, TOKENS = 256, 64  # per probe domain: the job's default max_samples and max_length
QUICK_SAMPLES, QUICK_TOKENS = 32, 16
TASK = "antonyms_mc"  # the bundled multiple-choice task (30 documents)

# What each evaluation spends its time on, how many per-batch setups its first tick carries (the
# forward of a batch, the Hessian's gradient graph), and how many ticks the full run waits for.
PLAN = {
    "heldout_loss": ("forward", 0, 0),
    TASK: ("forward per (context, choice)", 0, 0),
    "hessian_trace": ("HVP (double backward)", 2, 2),
    "hessian_top_eigenvalue": ("HVP + gradient graph per batch", 0, 0),
    "fisher_trace": ("backward per label draw", 2, 2),
    "adaptive_sharpness": ("forward per noise draw", 2, 2),
    "perturbation_sensitivity": ("forward per noise draw", 2, 2),
    "sam_sharpness": ("backward + forward", 0, 0),
    "gradient_alignment": ("backward per half-domain", 0, 2),
}


class _Enough(Exception):
    """Raised from a progress callback once the ticks that the extrapolation needs are in."""


def _peak_mb() -> float:
    # ru_maxrss is KiB on Linux (bytes on macOS).
    scale = 1 if platform.system() == "Darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def build_checkpoint(folder: Path, shape: dict) -> int:
    """Save a randomly initialised GPT-NeoX of ``shape`` in bf16 with a word tokenizer; returns its size."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from analysis.evals.tasks import task_vocabulary
    from analysis.models import build_word_tokenizer

    config = GPTNeoXConfig(**shape, rotary_pct=0.25, use_parallel_residual=True, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    model.to(torch.bfloat16).save_pretrained(folder)
    # Pythia's BPE tokenizer is not here offline; a word-level one covers the bundled tasks' words.
    words = sorted(set(task_vocabulary()) | {str(i) for i in range(100)})
    build_word_tokenizer(words).save_pretrained(folder)
    return n_params


def build_probe(folder: Path, vocab: int, samples: int, tokens: int) -> Path:
    """Two probe domains of random token ids (input_ids JSONL), like the job's default probe in size."""
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(1)
    for name in ("web", "code"):
        ids = torch.randint(4, vocab, (samples, tokens), generator=gen)
        (folder / f"{name}.jsonl").write_text("".join(json.dumps({"input_ids": row.tolist()}) + "\n" for row in ids))
    return folder


# --- one evaluation, in a fresh subprocess ----------------------------------------------------------


def child(task: dict) -> dict:
    """Run one evaluation as a job would and return its timings and this process's peak memory."""
    from analysis.evals.heldout import heldout_loss, load_probe_set
    from analysis.jobs.kinds import probe_batches
    from analysis.jobs.precision import metric_purpose
    from analysis.jobs.spec import JobSpec
    from analysis.metrics.common import to_device
    from analysis.models import compute_dtype_for, dtype_name, load_model, pad_token_id, stored_dtype

    torch.set_num_threads(task["threads"])
    name, folder, data = task["name"], task["checkpoint"], task["data"]
    device = torch.device(task["device"])
    dtype = compute_dtype_for(device, stored_dtype(folder), metric_purpose(name), requested=task["dtype"])
    started = time.perf_counter()
    model, tokenizer = load_model(folder, device=device, dtype=dtype, lazy_tokenizer=True)
    sync(device)
    out: dict = {"name": name, "dtype": dtype_name(dtype), "load_s": time.perf_counter() - started}
    out["loaded_mb"] = _peak_mb()
    if name == "heldout_loss":
        probe = load_probe_set(data, tokenizer, task["tokens"], max_samples=task["heldout_samples"])
        if device.type != "cpu":
            # The first CUDA calls set up cuBLAS and the allocator: the full run scales the measured
            # time 16x, which would multiply that one-off cost too.
            heldout_loss(model, probe, batch_size=16)
            sync(device)
        begin = time.perf_counter()
        heldout_loss(model, probe, batch_size=16)
        sync(device)
        out["seconds"] = time.perf_counter() - begin
        out["scale"] = task["samples"] / task["heldout_samples"]  # time is linear in the number of batches
    elif name == TASK:
        from analysis.evals.lmeval import run_lm_eval

        begin = time.perf_counter()
        run_lm_eval(model, tokenizer.get(f"the prompts of {TASK}"), [TASK], batch_size=16)
        sync(device)
        out["seconds"] = time.perf_counter() - begin
        out["scale"] = 1.0
    else:
        from analysis.metrics.registry import compute

        probe = load_probe_set(data, tokenizer, task["tokens"], max_samples=task["samples"])
        spec = JobSpec(run="bench", metrics=(name,), data=data, max_length=task["tokens"])
        batches = probe_batches(probe, spec, pad_token_id(model))
        if metric_purpose(name) == "gradient":
            _warm_up(model, to_device(batches[0], device))
        ticks: list[float] = []
        total = {"n": 0}

        def progress(i: int, n: int) -> None:
            sync(device)  # a tick is the unit's work done, not merely queued on a GPU
            ticks.append(time.perf_counter())
            total["n"] = n
            if task["stop_after"] and len(ticks) >= task["stop_after"]:
                raise _Enough

        begin = time.perf_counter()
        try:
            compute(name, model, batches, None, device=device, seed=0, progress=progress)
            out["finished"] = True
        except _Enough:
            out["finished"] = False
        out["seconds"] = time.perf_counter() - begin
        out["ticks"] = [t - begin for t in ticks]
        out["n_ticks"] = total["n"]
        out["batches"] = len(batches)
    out["peak_mb"] = _peak_mb()
    if device.type == "cuda":
        out["gpu_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def _warm_up(model: torch.nn.Module, batch: dict) -> None:
    """One untimed gradient on two samples, so that first-call costs (autograd, kernels) stay out of the first tick."""
    from analysis.metrics.common import lm_loss

    small = {key: value[:2] for key, value in batch.items()}
    with torch.enable_grad():
        loss, _ = lm_loss(model, small)
        torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])


def ratio_child(task: dict) -> dict:
    """Held-out loss on the same batches: the model as stored (bf16) against upcast to float32 at load."""
    from analysis.evals.heldout import heldout_loss, load_probe_set
    from analysis.models import FORWARD, compute_dtype_for, cpu_native_dtypes, dtype_name, load_model

    torch.set_num_threads(task["threads"])
    device = torch.device(task["device"])
    stored, _ = load_model(task["checkpoint"], device=device, lazy_tokenizer=True)  # dtype None: as stored
    upcast, _ = load_model(task["checkpoint"], device=device, dtype=torch.float32, lazy_tokenizer=True)
    probe = load_probe_set(task["data"], None, task["tokens"], max_samples=task["heldout_samples"])
    # Warm-up: first-call allocations; on a GPU each dtype sets up its own kernels (an untimed bf16 pass on
    # this CPU would cost half a minute for nothing).
    for model in (upcast,) if device.type == "cpu" else (stored, upcast):
        heldout_loss(model, probe, batch_size=16)
    times: dict[str, list[float]] = {"bf16": [], "fp32": []}
    for _ in range(task["repeats"]):  # interleaved, so load from other processes hits both alike
        for label, model in (("bf16", stored), ("fp32", upcast)):
            sync(device)
            begin = time.perf_counter()
            heldout_loss(model, probe, batch_size=16)
            sync(device)
            times[label].append(time.perf_counter() - begin)
    chosen = compute_dtype_for(device, torch.bfloat16, FORWARD)
    return {
        "bf16_s": statistics.median(times["bf16"]),
        "fp32_s": statistics.median(times["fp32"]),
        "times": times,
        "chosen": dtype_name(chosen),
        "native": sorted(dtype_name(d) for d in cpu_native_dtypes()),
        "device": str(device),
    }


def _run_child(task: dict) -> dict:
    """``task`` in a fresh interpreter (peak memory is per process); its JSON answer, or ``{"error": ...}``."""
    command = [sys.executable, "-m", "bench.checkpoint_cost", "--child", json.dumps(task)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:  # one failing evaluation leaves the others' rows
        return {"error": (done.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- the table ---------------------------------------------------------------------------------------


def estimate(row: dict, name: str) -> tuple[float, str]:
    """Seconds at the defaults (measured, scaled or extrapolated from the first ticks) and how it was had."""
    if "ticks" not in row or len(row["ticks"]) < 2:
        scale = row.get("scale", 1.0)
        how = "measured" if scale == 1.0 else f"measured 1/{scale:g} of it, scaled"
        return row["seconds"] * scale, how
    ticks = row["ticks"]
    first = ticks[0]
    unit = statistics.median(b - a for a, b in itertools.pairwise(ticks))
    setups = PLAN[name][1]
    value = setups * max(first - unit, 0.0) + row["n_ticks"] * unit if setups else first + (row["n_ticks"] - 1) * unit
    how = "measured" if row["finished"] else f"{len(ticks)} of {row['n_ticks']} ticks, extrapolated"
    return (row["seconds"] if row["finished"] else value), how


def eigen_from_trace(trace: dict, max_iter: int) -> float:
    """The top eigenvalue's cost at max_iter products, each a gradient graph and an HVP on every batch."""
    return max_iter * trace["batches"] * trace["ticks"][0]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 2-layer width-32 model: a smoke test of the bench")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads per process")
    parser.add_argument("--device", default="cpu", help="where every evaluation runs: cpu, cuda, cuda:N")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), help="compute every evaluation in this dtype (default: the rule)"
    )
    parser.add_argument("--json", help="also write the rows as JSON here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        task = json.loads(args.child)
        print(json.dumps(ratio_child(task) if task["name"] == "ratio" else child(task)))
        return

    shape = QUICK if args.quick else FULL
    samples, tokens = (QUICK_SAMPLES, QUICK_TOKENS) if args.quick else (SAMPLES, TOKENS)
    # Held-out loss runs 2 of its 32 batches in the full run (scaled), all of them with --quick.
    common = {"samples": samples, "tokens": tokens, "heldout_samples": samples if args.quick else 16,
              "device": args.device, "dtype": args.dtype}  # fmt: skip
    wall = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="checkpoint-cost-") as tmp:
        folder = Path(tmp) / "step143000"
        n_params = build_checkpoint(folder, shape)
        size_mb = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**20
        data = str(build_probe(Path(tmp) / "probe", shape["vocab_size"], samples, tokens))
        print(
            f"checkpoint: GPT-NeoX {n_params / 1e6:.1f}M parameters ({shape['num_hidden_layers']} layers, "
            f"width {shape['hidden_size']}), bf16 safetensors {size_mb:.0f} MB; probe 2 domains x {samples} x "
            f"{tokens} tokens; {args.threads} torch threads; {os.cpu_count()} CPUs; on {describe_device(args.device)}"
            f"{f', every evaluation in {args.dtype}' if args.dtype else ''}",
            flush=True,
        )
        rows: dict[str, dict] = {}
        for name in PLAN:
            if name == "hessian_top_eigenvalue" and not args.quick:
                continue  # hours here: estimated from the Hessian trace's first tick below
            # --quick runs everything to the end but the eigenvalue (3 products: enough to check the cost model).
            stop = (3 if name == "hessian_top_eigenvalue" else 0) if args.quick else PLAN[name][2]
            task = {"name": name, "checkpoint": str(folder), "data": data, "stop_after": stop,
                    "threads": args.threads, **common}  # fmt: skip
            rows[name] = row = _run_child(task)
            done = row["error"] if "error" in row else f"{row['seconds']:.1f} s run, peak {row['peak_mb']:.0f} MB"
            print(f"  {name}: {done}", flush=True)
            if args.json:  # as it goes: a later failure keeps what was measured
                Path(args.json).write_text(json.dumps({"rows": rows, "quick": args.quick}, indent=1))
        ratio = _run_child({"name": "ratio", "checkpoint": str(folder), "data": data, "threads": args.threads,
                            **common, "heldout_samples": 8 if not args.quick else samples, "repeats": 3})  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "ratio": ratio, "quick": args.quick}, indent=1))
    _print_table(rows, ratio, args.quick, n_params, gpu=torch.device(args.device).type == "cuda")
    print(f"bench wall time {time.perf_counter() - wall:.0f} s")


def _print_table(rows: dict[str, dict], ratio: dict, quick: bool, n_params: int, gpu: bool = False) -> None:
    from analysis.metrics.registry import get_metric

    max_iter = get_metric("hessian_top_eigenvalue").config_cls().max_iter
    print()
    print(
        f"| evaluation | dtype | seconds at defaults | how | peak MB |{' GPU peak MB |' if gpu else ''} dominant cost |"
    )
    print(f"| --- | --- | ---: | --- | ---: |{' ---: |' if gpu else ''} --- |")
    total = 0.0
    for name, (dominant, _, _) in PLAN.items():
        row, trace = rows.get(name, {}), rows["hessian_trace"]
        if "error" in row or (name == "hessian_top_eigenvalue" and "error" in trace):
            print(f"| {name} | | failed | {row.get('error') or trace['error']} | |{' |' if gpu else ''} {dominant} |")
            continue
        if name == "hessian_top_eigenvalue" and not quick:
            seconds = eigen_from_trace(trace, max_iter)
            how = f"up to {max_iter} products, from hessian_trace's first tick"
            # At this size Lanczos' basis does not fit basis_mb: the three-term recurrence holds three more
            # parameter-sized float32 vectors than the trace (power iteration: two).
            extra_mb = 3 * n_params * 4 / 2**20
            peak, dtype = f"~{trace['peak_mb'] + (0 if gpu else extra_mb):.0f}", trace["dtype"]
            gpu_peak = f"~{trace.get('gpu_peak_mb', 0.0) + extra_mb:.0f}"
        else:
            seconds, how = estimate(row, name)
            if name == "hessian_top_eigenvalue":  # its own ticks against the cost model the full run uses
                how += f" (cost model from hessian_trace: {eigen_from_trace(trace, row['n_ticks']):.1f} s)"
            elif quick and "ticks" in row and len(row["ticks"]) >= 3:  # the linear cost model against the clock
                how += f" (cost model: {estimate({**row, 'finished': False}, name)[0]:.1f} s)"
            peak, dtype = f"{row['peak_mb']:.0f}", row["dtype"]
            gpu_peak = f"{row.get('gpu_peak_mb', 0.0):.0f}"
        total += seconds
        gpu_cell = f" {gpu_peak} |" if gpu else ""
        print(f"| {name} | {dtype} | {_duration(seconds)} | {how} | {peak} |{gpu_cell} {dominant} |")
    print(f"| all of the above | | {_duration(total)} | | |{' |' if gpu else ''} |")
    print()
    if "error" in ratio:
        print(f"bf16 against fp32: failed ({ratio['error']})")
        return
    bf16, fp32 = ratio["bf16_s"], ratio["fp32_s"]
    if gpu:
        why = f"on {ratio['device']} the rule computes forward passes in the stored dtype, {ratio['chosen']}"
    else:
        native = ", ".join(ratio["native"]) or "none"
        why = f"this CPU's native low precision: {native}, so the rule computes forward passes in {ratio['chosen']}"
    print(
        f"held-out loss, same batches, medians of {len(ratio['times']['bf16'])}: bf16 as stored {bf16:.2f} s, "
        f"fp32 upcast at load {fp32:.2f} s, ratio bf16/fp32 = {bf16 / fp32:.2f}x; {why}"
    )


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


if __name__ == "__main__":
    main()
