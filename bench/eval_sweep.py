"""A sweep of N checkpoints x M bundled tasks: this engine against lm-eval's command line per checkpoint.

The baseline is how sweeps are usually run: one ``lm_eval --model hf`` process per checkpoint.
The engine loads each checkpoint once in one process, evaluates every task on the object, and
caches the results (a second identical sweep is also timed: it loads nothing).

    python -m bench.eval_sweep [--checkpoints 4] [--tasks sequence_ll,antonyms_mc,counting_em]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import report


def make_checkpoints(root: Path, n: int) -> Path:
    from transformers import OlmoeForCausalLM

    from analysis.evals.tasks import task_vocabulary
    from analysis.models import build_word_tokenizer, tiny_moe_config

    words = [str(i) for i in range(20)] + ["+", "="]
    tokenizer = build_word_tokenizer(words + [w for w in task_vocabulary() if w not in set(words)])
    for i in range(n):
        torch.manual_seed(i)
        model = OlmoeForCausalLM(tiny_moe_config(len(tokenizer), hidden_size=64, num_heads=2))
        model.save_pretrained(root / "run" / f"step_{(i + 1) * 100}")
        tokenizer.save_pretrained(root / "run" / f"step_{(i + 1) * 100}")
    return root / "run"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoints", type=int, default=4)
    parser.add_argument("--tasks", default="sequence_ll,antonyms_mc,counting_em")
    args = parser.parse_args(argv)
    tasks = args.tasks.split(",")

    from analysis.evals.tasks import materialize_tasks
    from analysis.jobs import JobSpec, run_job, submit
    from analysis.runs.load import load_run
    from analysis.store import Store

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        run_dir = make_checkpoints(root, args.checkpoints)
        include = materialize_tasks(root / "tasks")

        store = Store(root / "cache.duckdb")
        store.register_run(load_run(run_dir))
        start = time.perf_counter()
        run_job(store, submit(store, JobSpec(run="run", tasks=tuple(tasks))))
        ours = time.perf_counter() - start
        start = time.perf_counter()
        run_job(store, submit(store, JobSpec(run="run", tasks=tuple(tasks))))
        cached = time.perf_counter() - start

        lm_eval = Path(sys.executable).parent / "lm_eval"
        start = time.perf_counter()
        for folder in sorted(run_dir.iterdir()):
            cmd = [
                str(lm_eval), "run", "--model", "hf", "--model_args", f"pretrained={folder},dtype=float32",
                "--tasks", ",".join(tasks), "--include_path", str(include), "--device", "cpu",
                "--batch_size", "16", "--output_path", str(root / "out" / folder.name),
            ]  # fmt: skip
            subprocess.run(cmd, check=True, capture_output=True, env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                           "PATH": "/usr/bin:/bin", "HOME": tmp})  # fmt: skip
        baseline = time.perf_counter() - start
        sweep = f"{args.checkpoints} checkpoints x {len(tasks)} tasks"
        report("eval sweep (first run)", ours, baseline, sweep)
        report("eval sweep (repeat, cached)", cached, baseline, sweep)
        n = len(json.loads(json.dumps(list(store.results("run")["metric"].unique()))))
        print(f"  {n} distinct metrics stored per checkpoint")


if __name__ == "__main__":
    main()
