"""Small files in the formats published runs come in (see NOTES.md), for tests and for trying the CLI by hand.

- lm-eval 0.3 results (Pythia's sweeps): plain ``acc``/``acc_stderr`` keys, ``ppl`` for lambada, a
  ``config.model_args`` string naming the revision, ``hendrycksTest-<subject>`` tasks, no ``date``;
- lm-eval 0.4.x results: ``acc,none`` keys, ``groups``, ``higher_is_better``, ``n-shot``, ``n-samples``,
  ``model_args`` as a dict (0.4.10 on), and ``date``, the unix time the run started;
- an HF Trainer output folder shared without weights (``checkpoint-N/`` with trainer_state.json,
  training_args.bin, config.json, no model files);
- Git LFS pointer files, what a clone without git-lfs holds in place of weights and event files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

LFS_POINTER = (
    "version https://git-lfs.github.com/spec/v1\n"
    "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\n"
    "size 281474976\n"
)


def write_lfs_pointer(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(LFS_POINTER)
    return path


def lmeval03(step: int, scores: dict[str, dict[str, float]], *, model: str = "EleutherAI/pythia-70m") -> dict:
    """An lm-eval 0.3 results file as Pythia's sweeps publish them."""
    return {
        "results": scores,
        "versions": {task: 0 for task in scores},
        "config": {
            "model": "gpt2",
            "model_args": f"pretrained={model},revision=step{step}",
            "num_fewshot": 0,
            "batch_size": None,
            "device": "cuda:0",
            "no_cache": True,
            "limit": None,
            "bootstrap_iters": 100000,
            "description_dict": {},
        },
    }


def lmeval04(step: int, scores: dict[str, dict[str, float]], *, date: float, shots: int = 0) -> dict:
    """An lm-eval 0.4.x results file (schema of 0.4.10+: ``model_args`` a dict, ``date`` a unix time)."""
    results = {task: {"alias": task, **values} for task, values in scores.items()}
    metrics = {
        task: {key.split(",")[0]: True for key in values if "_stderr" not in key} for task, values in scores.items()
    }
    return {
        "results": results,
        "groups": {},
        "group_subtasks": {task: [] for task in scores},
        "configs": {},
        "versions": {task: 1.0 for task in scores},
        "n-shot": {task: shots for task in scores},
        "higher_is_better": metrics,
        "n-samples": {task: {"original": 1000, "effective": 1000} for task in scores},
        "config": {
            "model": "hf",
            "model_args": {"pretrained": "EleutherAI/pythia-70m", "revision": f"step{step}", "dtype": "float16"},
            "batch_size": "auto",
            "device": "cuda:0",
            "limit": None,
            "bootstrap_iters": 100000,
        },
        "git_hash": "4600d6bf",
        "date": date,
        "lm_eval_version": "0.4.8",
    }


def write_json(path: Path, data: dict, *, mtime: float | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def pythia_sweep(folder: Path, steps: tuple[int, ...] = (1000, 2000, 3000)) -> Path:
    """One 0.3 result file per step, as in Pythia's zero-shot sweeps: lambada (ppl and acc) and piqa."""
    for step in steps:
        lambada = {"ppl": 4000.0 / (step / 1000), "ppl_stderr": 50.0, "acc": step / 10000, "acc_stderr": 0.006}
        piqa = {
            "acc": 0.5 + step / 100000,
            "acc_stderr": 0.011,
            "acc_norm": 0.5 + step / 200000,
            "acc_norm_stderr": 0.012,
        }
        scores = {"lambada_openai": lambada, "piqa": piqa}
        write_json(folder / f"EleutherAI_pythia-70m_step{step}_0-shot.json", lmeval03(step, scores))
    return folder


def trainer_state(steps: range, *, eval_every: int = 100) -> dict:
    """A transformers.Trainer ``trainer_state.json`` whose log_history runs up to the last step."""
    history = []
    for step in steps:
        history.append(
            {"epoch": step / 1000, "grad_norm": 1.0, "learning_rate": 1e-4, "loss": 5.0 - step / 1000, "step": step}
        )
        if step % eval_every == 0:
            history.append({"epoch": step / 1000, "eval_loss": 5.2 - step / 1000, "eval_runtime": 3.1, "step": step})
    return {
        "best_metric": None,
        "epoch": steps[-1] / 1000,
        "eval_steps": eval_every,
        "global_step": steps[-1],
        "is_hyper_param_search": False,
        "log_history": history,
        "logging_steps": steps.step,
        "max_steps": 1000,
        "save_steps": 100,
        "total_flos": 1.2e15,
        "train_batch_size": 8,
    }  # fmt: skip


def weightless_trainer_run(root: Path, saves: tuple[int, ...] = (100, 200, 300)) -> Path:
    """A Trainer output folder shared without weights: each checkpoint-N/ has its state, config and args."""
    for save in saves:
        folder = root / f"checkpoint-{save}"
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / "trainer_state.json", trainer_state(range(10, save + 1, 10)))
        write_json(folder / "config.json", {"model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"]})
        (folder / "training_args.bin").write_bytes(b"PK\x03\x04 not a model")
        (folder / "scheduler.pt").write_bytes(b"PK\x03\x04 scheduler")
    return root


PYTHIA = Path(__file__).parent / "fixtures" / "pythia"
CROWS_PAIRS = ("crows_pairs_english", "crows_pairs_french")


def pythia_wide_sweep(folder: Path, size: str = "70m") -> Path:
    """A sweep shaped like Pythia's published zero-shot folder: the 27 trimmed real files (8 tasks) with the
    57 MMLU subjects (``hendrycksTest-*``, 0.3 names) and two CrowS-Pairs tasks added back, one file per step.

    The added numbers are made up but shaped like the real ones: each subject drifts from chance (0.25) by its
    own amount over log-steps, with a deterministic wiggle and a stderr of a 100-300 item subject.
    """
    import math

    from analysis.evals.lmeval import MMLU_SUBJECTS

    subjects = sorted(MMLU_SUBJECTS)
    for source in sorted((PYTHIA / size).glob("*.json")):
        data = json.loads(source.read_text())
        step = int(data["config"]["model_args"].rsplit("revision=step", 1)[1].split(",")[0])
        progress = math.log1p(step) / math.log1p(143000)  # 0 at step 0, 1 at the last checkpoint
        for i, subject in enumerate(subjects):
            n = 100 + (i * 37) % 200
            drift = 0.12 * ((i * 13) % 11) / 10 - 0.02  # -0.02 .. +0.1: some subjects move, most barely
            acc = 0.25 + drift * progress + 0.01 * math.sin(3 * i + step / 7000)
            se = math.sqrt(acc * (1 - acc) / n)
            norm = acc - 0.01 + 0.005 * math.cos(i + step / 9000)
            data["results"][f"hendrycksTest-{subject}"] = {
                "acc": acc, "acc_stderr": se, "acc_norm": norm, "acc_norm_stderr": se,
            }  # fmt: skip
            data["versions"][f"hendrycksTest-{subject}"] = 0
        for j, task in enumerate(CROWS_PAIRS):
            stereo = 0.5 + 0.12 * progress + 0.01 * j
            data["results"][task] = {
                "likelihood_difference": 4.5 - 1.2 * progress + j, "likelihood_difference_stderr": 0.11,
                "pct_stereotype": stereo, "pct_stereotype_stderr": 0.012,
            }  # fmt: skip
            data["versions"][task] = 0
        write_json(folder / source.name, data)
    return folder
