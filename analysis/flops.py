"""Training compute as an x-axis: FLOPs ~ 6 * N * D, with N read off a run's checkpoint.

N is the parameter count a token passes through: every tensor in the safetensors header of the run's
last checkpoint, with a mixture-of-experts layer's expert tensors (names holding ``.experts.``) counted
at ``num_experts_per_tok / num_experts`` of their size, so an MoE run is charged for its active experts
only. Embeddings count too (the usual 6ND convention of compute-optimal scaling work). D is the tokens
seen, from the run's checkpoints or log. Only the header is read: no weights are loaded, nothing runs.

A run has no FLOPs when neither is known (hub runs and ``.bin`` checkpoints have no header to read;
runs without token counts have no D); :func:`flops_axis` then falls back to tokens, else steps.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from analysis.runs.local import checkpoint_parts, read_safetensors_header


@dataclass(frozen=True)
class ParameterCount:
    """Parameters of one checkpoint: all of them, and those one token passes through (MoE: top-k experts)."""

    total: int
    active: int
    source: str  # the file(s) it was read from


def _config(folder: Path) -> dict:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return config if isinstance(config, dict) else {}


def _weights_files(path: str | Path) -> list[Path]:
    folder, single = checkpoint_parts(path)
    if single is not None:
        return [single] if single.name.endswith(".safetensors") else []
    return sorted(folder.glob("*.safetensors"))


def count_parameters(path: str | Path) -> ParameterCount:
    """The parameter count of a checkpoint folder or weights file, from its safetensors header(s).

    Raises ValueError with one line when there is no safetensors file to read (a ``.bin`` checkpoint, a
    hub revision, a missing folder) or a header is broken.
    """
    files = _weights_files(path)
    if not files:
        raise ValueError(f"{path}: no safetensors weights to count parameters from")
    folder, _ = checkpoint_parts(path)
    config = _config(folder)
    experts, top_k = config.get("num_experts") or config.get("num_local_experts"), config.get("num_experts_per_tok")
    share = top_k / experts if isinstance(experts, int) and isinstance(top_k, int) and 0 < top_k <= experts else 1.0
    total = active = 0.0
    for file in files:
        header = json.loads(read_safetensors_header(file))
        for name, entry in header.items():
            if name == "__metadata__" or not isinstance(entry, dict):
                continue
            size = math.prod(int(d) for d in entry.get("shape", []))
            total += size
            active += size * share if ".experts." in name else size
    if total <= 0:
        raise ValueError(f"{path}: the safetensors header lists no tensors")
    return ParameterCount(int(total), round(active), ", ".join(f.name for f in files))


def run_parameter_count(checkpoint_paths: Sequence[str]) -> tuple[int | None, str]:
    """(active parameter count, "") from a run's last checkpoint that has one, else (None, why not in a few words).

    ``checkpoint_paths`` are the run's checkpoint paths in step order (the store's ``checkpoints`` table).
    """
    if not len(checkpoint_paths):
        return None, "no checkpoints to read the model size from"
    last = str(checkpoint_paths[-1])
    if last.startswith("hf://"):
        return None, "model size unknown for a hub run (its weights are not here)"
    try:
        return count_parameters(last).active, ""
    except (ValueError, OSError) as err:
        return None, f"model size unknown ({' '.join(str(err).split())})"


def flops_axis(
    counts: Mapping[str, int | None], has_tokens: Mapping[str, bool], why: Mapping[str, str] | None = None
) -> tuple[str, str]:
    """(x-axis to draw, one-line note) for a FLOPs request over the runs in ``counts``.

    Every run needs a parameter count and token counts for FLOPs; FLOPs of some runs and not others
    cannot share an axis, so one run without them sends the whole view to tokens (or, when a run lacks
    token counts too, to steps). The note says which run and why; it is "" when FLOPs are drawn.
    """
    why = why or {}
    missing = [(run, why.get(run) or "model size unknown") for run, n in counts.items() if not n]
    missing += [(run, "no token counts") for run in counts if not has_tokens.get(run, False) and counts[run]]
    if not missing:
        return "flops", ""
    fallback = "tokens" if all(has_tokens.get(run, False) for run in counts) else "step"
    run, reason = sorted(missing)[0]
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    return fallback, f"No FLOPs for run {run!r}{more}: {reason}; x-axis shows {fallback} instead."


def add_flops_column(frame: pd.DataFrame, counts: Mapping[str, int | None]) -> pd.DataFrame:
    """``frame`` (run, tokens, ...) with ``flops`` = 6 * N * tokens per run; NaN where N or tokens is unknown."""
    if "run" not in frame:
        raise ValueError("add_flops_column needs a run column (and tokens) to give each row its FLOPs")
    n = frame["run"].astype(str).map(lambda run: float(counts.get(run) or math.nan)).astype(float)
    tokens = pd.to_numeric(frame["tokens"], errors="coerce") if "tokens" in frame else math.nan
    return frame.assign(flops=6.0 * n * tokens)


def store_parameter_counts(store, runs: Sequence[str]) -> dict[str, tuple[int | None, str, bool]]:
    """run -> (active parameter count or None, why it is unknown, whether its checkpoints have token counts)."""
    out = {}
    for run in runs:
        checkpoints = store.checkpoints(run)
        count, why = run_parameter_count(list(checkpoints["path"]))
        out[str(run)] = (count, why, bool(checkpoints["tokens"].notna().any()))
    return out
