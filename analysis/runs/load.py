"""Load a whole run, local folder or hub repository, into a :class:`Run`."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.runs.base import Checkpoint, Run
from analysis.runs.hub import HF_PREFIX, hub_checkpoints, parse_hub_path
from analysis.runs.local import checkpoint_parts, discover_checkpoints
from analysis.runs.logs import find_logs, merge_logs, read_log
from analysis.runs.stepmap import apply_steps

# Settings copied from the latest checkpoint's config.json into Run.config.
CONFIG_KEYS = ("model_type", "architectures")


def fill_tokens(checkpoints: list[Checkpoint], log: pd.DataFrame) -> list[Checkpoint]:
    """Give checkpoints without a token count the one the log has at their step.

    A step the log has tokens for is used as is; a step between two such steps is
    interpolated linearly; steps outside the logged range keep ``tokens=None``.
    """
    known = log.dropna(subset=["tokens"]).drop_duplicates("step", keep="last").sort_values("step")
    if known.empty:
        return list(checkpoints)
    steps = known["step"].to_numpy(dtype="float64")
    tokens = known["tokens"].to_numpy(dtype="float64")
    filled = []
    for checkpoint in checkpoints:
        if checkpoint.tokens is None and steps[0] <= checkpoint.step <= steps[-1]:
            checkpoint = replace(checkpoint, tokens=round(float(np.interp(checkpoint.step, steps, tokens))))
        filled.append(checkpoint)
    return filled


def _config_summary(checkpoints: list[Checkpoint]) -> dict:
    """A few settings from the latest checkpoint's config.json (empty when it cannot be read)."""
    if not checkpoints:
        return {}
    folder, _ = checkpoint_parts(checkpoints[-1].path)
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    if not isinstance(config, dict):
        return {}
    return {key: config[key] for key in CONFIG_KEYS if key in config}


def _read_logs(files: list[Path], problems: list[str]) -> list[pd.DataFrame]:
    """Read found logs; an unreadable one becomes a problem line instead of an error."""
    frames = []
    for file in files:
        try:
            result = read_log(file)
        except ValueError as err:
            problems.append(f"{err} (log skipped)")
            continue
        frames.append(result.frame)
        problems.extend(result.problems)
    return frames


def _load_hub(source: str, name: str | None, refs: list[str] | None, revision_filter: str | None = None) -> Run:
    repo_id, revision = parse_hub_path(source)
    if refs is None and revision is not None:
        refs = [revision]
    checkpoints = hub_checkpoints(repo_id, refs, revision_filter)
    problems = [] if checkpoints else [f"{HF_PREFIX}{repo_id}: no branches named like step1000 or step1000-tokens4B"]
    return Run(
        name=name or repo_id.rsplit("/", 1)[-1],
        source=f"{HF_PREFIX}{repo_id}",
        checkpoints=checkpoints,
        problems=problems,
        config={"repo_id": repo_id},
    )


def _load_local(path: str | Path, name: str | None) -> Run:
    root = Path(path).expanduser()
    checkpoints, problems = discover_checkpoints(root)
    root = root.resolve()
    frames = _read_logs(find_logs(root, checkpoints), problems)
    return Run(
        name=name or root.name,
        source=str(root),
        checkpoints=checkpoints,
        log=merge_logs(frames),
        problems=problems,
        config=_config_summary(checkpoints),
    )


def read_revisions(value: str) -> list[str]:
    """Revision names from ``--revisions``: a comma-separated list, or a file with one name a line (or commas).

    Raises ValueError when the list is empty.
    """
    file = Path(value).expanduser()
    text = file.read_text(encoding="utf-8") if file.is_file() else value
    names = [part.strip() for line in text.splitlines() for part in line.split(",") if part.strip()]
    if not names:
        raise ValueError(f"--revisions {value!r}: no revision names; write step1000,step2000 or a file of names")
    return names


def load_run(
    path: str | Path,
    name: str | None = None,
    log: str | Path | None = None,
    refs: list[str] | None = None,
    step_map: str | Path | None = None,
    steps_per_checkpoint: int | None = None,
    revision_filter: str | None = None,
) -> Run:
    """Load a run: its checkpoints, its merged training log and what could not be used.

    ``path`` is a local run folder or ``hf://org/model`` (``hf://org/model@step1000`` for one
    revision; ``refs`` names the revisions instead of listing them online; ``revision_filter``,
    a glob or regex, keeps only the revisions it matches: ``hub.revision_matcher``). Logs found in a
    local folder are merged (see ``logs.find_logs``); an unreadable one becomes a line in
    ``Run.problems``. ``log`` is read last, so it wins on shared (step, metric) pairs; unlike
    found logs it must be readable, else ValueError. ``step_map`` / ``steps_per_checkpoint``
    give checkpoints named by index (LLM360's ``ckpt_NNN``) their steps (see ``stepmap.apply_steps``).
    Checkpoints whose names carry no token count get it from the log. ``name`` defaults to the
    folder or repository name. Raises ValueError with one line when the run has neither
    checkpoints nor log rows.
    """
    source = str(path)
    hub = source.startswith(HF_PREFIX)
    if refs is not None and not hub:
        raise ValueError(f"{source}: --revisions names hub revisions; use it with hf://ORG/MODEL")
    if revision_filter is not None and not hub:
        raise ValueError(f"{source}: --revision-filter selects hub revisions; use it with hf://ORG/MODEL")
    run = _load_hub(source, name, refs, revision_filter) if hub else _load_local(path, name)
    run = apply_steps(run, step_map, steps_per_checkpoint)
    if log is not None:
        result = read_log(log)
        run.log = merge_logs([run.log, result.frame])
        run.problems.extend(result.problems)
    run.checkpoints = fill_tokens(run.checkpoints, run.log)
    if not run.checkpoints and run.log.empty:
        fix = f"first problem: {run.problems[0]}" if run.problems else "pass a folder with checkpoint-N/ folders"
        raise ValueError(f"{source}: no usable checkpoints or training log; {fix}")
    return run
