"""Multiple-choice scoring: one forward pass per context (OnePassLM) against lm-eval's HFLM.

Both backends score the same loglikelihood requests in this process on a GPT-NeoX of Pythia-like
shape with random weights (width 384, 6 layers), once with Pythia's 50,304-token vocabulary (the
word-level tokenizer uses the first ~150 ids; the output layer is then most of the work per
token) and once with the word vocabulary alone, like the demo models. The requests are the
(context, " " + choice) pairs lm-eval's multiple_choice tasks make, from ``cycles_mc`` records
with contexts and choices of several lengths (four choices each), and from ``antonyms_mc``
(one-word choices).

    python -m bench.mc_scoring [--docs 16] [--repeats 3] [--batch-size 8] [--vocab 50304,0] [--threads 1]
                               [--device cpu] [--dtype float32]

Prints, per shape and vocabulary, the medians and ratios HFLM / OnePassLM (always one pass) and
HFLM / OnePassLM "auto" (which path it chose), :func:`work_saving` (the estimate "auto" decides by)
and the largest relative difference in a log-likelihood between the two paths. One torch thread by
default: this machine's two cores are shared, and threads made the timings swing. ``--device cuda``
runs both backends on a GPU (``--dtype bfloat16``: as a job computes forward passes there, in the
stored dtype of a bf16 checkpoint).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.common import DTYPES, describe_device, report, sync

# (name, context words low-high, words per choice, documents as a multiple of --docs)
SHAPES = (
    ("1-word contexts, 8-word choices", (1, 1), 8, 2),
    ("3-word contexts, 8-word choices", (3, 3), 8, 2),
    ("3-word contexts, 3-word choices", (3, 3), 3, 2),
    ("8-word contexts, 3-word choices", (8, 8), 3, 2),
    ("24-word contexts, 3-word choices", (24, 24), 3, 1),
    ("64-128-word contexts, 3-word choices", (64, 128), 3, 1),
)


def _model(vocab: int, width: int, layers: int, device: torch.device, dtype: torch.dtype):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    config = GPTNeoXConfig(
        vocab_size=vocab,
        hidden_size=width,
        num_hidden_layers=layers,
        num_attention_heads=width // 64,
        intermediate_size=4 * width,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    # Initialised on the CPU in float32, then moved: the same weights on every device and dtype.
    return GPTNeoXForCausalLM(config).eval().to(device=device, dtype=dtype)


def _requests(records: list[dict], task: str) -> list:
    from lm_eval.api.instance import Instance

    return [
        Instance("loglikelihood", {}, (r["prompt"], " " + choice), idx=k, metadata=(task, d, 1))
        for d, r in enumerate(records)
        for k, choice in enumerate(r["choices"])
    ]


def _bench_model(vocab: int, args: argparse.Namespace, tokenizer, shapes: list[tuple[str, list[dict]]]) -> None:
    from lm_eval.models.huggingface import HFLM

    from analysis.evals.onepass import MIN_SAVING, OnePassLM, head_weight, work_saving

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    model = _model(max(vocab, len(tokenizer)), args.width, args.layers, device, dtype)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(
        f"GPT-NeoX width {args.width}, {args.layers} layers, vocab {model.config.vocab_size}, {params:.1f}M parameters"
    )
    # Both backends take the model object and compute where it is (lm-eval reads the model's device).
    arms = {
        "hf": HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size),
        "onepass": OnePassLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size, onepass="always"),
        "auto": OnePassLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size, onepass="auto"),
    }
    for name, records in shapes:
        requests = _requests(records, "bench")
        encoded = [(r.args, *arms["onepass"]._encode(*r.args)) for r in requests]
        saving = work_saving(encoded, head_weight(model))
        # The first call of each arm checks the answers and warms up; it is not timed.
        answers = {arm: lm.loglikelihood(requests, disable_tqdm=True) for arm, lm in arms.items()}
        sync(device)
        pairs = list(zip(answers["onepass"], answers["hf"], strict=True))
        diff = max(abs(a[0] - b[0]) / max(1.0, abs(b[0])) for a, b in pairs)
        greedy = "equal" if all(a[1] == b[1] for a, b in pairs) else "DIFFER"
        # Arms alternate within each repeat, so a change in the machine's load hits all of them alike.
        times: dict[str, list[float]] = {arm: [] for arm in arms}
        for _ in range(args.repeats):
            for arm, lm in arms.items():
                sync(device)
                start = time.perf_counter()
                lm.loglikelihood(requests, disable_tqdm=True)
                sync(device)  # kernels still queued on a GPU belong to this arm's time
                times[arm].append(time.perf_counter() - start)
        med = {arm: statistics.median(t) for arm, t in times.items()}
        what = (
            f"{len(records)} docs, {len(requests)} requests, work saving {saving:.2f}; "
            f"max relative |diff| {diff:.1e}, greedy flags {greedy}"
        )
        report(f"{name}: onepass", med["onepass"], med["hf"], what)
        choice = arms["auto"].paths["bench"]
        report(f"{name}: auto", med["auto"], med["hf"], f"auto chose {choice} (threshold {MIN_SAVING})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=16, help="documents per shape (short shapes use twice as many)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument(
        "--vocab", default="50304,0", help="vocabulary sizes, comma-separated; 0: the word tokenizer's own (~150)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default="cpu", help="torch device of both backends: cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="the model's dtype")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from analysis.evals.cycles import cycles_records
    from analysis.evals.tasks import DEFAULT_DATA_DIR, read_jsonl, task_vocabulary
    from analysis.models import build_word_tokenizer

    tokenizer = build_word_tokenizer(task_vocabulary())
    shapes = [
        (name, cycles_records(args.docs * mult, seed=7, context_words=words, answer_words=answer))
        for name, words, answer, mult in SHAPES
    ]
    shapes.append(("antonyms_mc, one-word choices", read_jsonl(DEFAULT_DATA_DIR / "antonyms" / "test.jsonl")))
    print(
        f"{args.dtype} on {describe_device(torch.device(args.device))}, batch size {args.batch_size}, "
        f"{torch.get_num_threads()} threads, medians of {args.repeats}"
    )
    for vocab in (int(v) for v in args.vocab.split(",")):
        _bench_model(vocab, args, tokenizer, shapes)


if __name__ == "__main__":
    main()
