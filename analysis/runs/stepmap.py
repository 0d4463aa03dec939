"""Checkpoint names that are not steps: LLM360's ``ckpt_NNN`` revisions, and step maps that fix them.

LLM360 publishes its runs (Amber, Crystal, K2) as hub revisions ``ckpt_000``, ``ckpt_001``, ...: the
number is the checkpoint's index, not its training step. Read as a step, every curve would be
drawn against the wrong axis. So a run with such names says so in one warning line, and takes the
real steps from the user when they have them: a step map (CSV with columns ``revision`` or
``checkpoint``, ``step`` and optionally ``tokens``), or a fixed number of steps per checkpoint.
"""

from __future__ import annotations

import csv
import re
from dataclasses import replace
from pathlib import Path

from analysis.runs.base import MAX_STEP, Checkpoint, Run, check_not_lfs_pointer

# LLM360's revision names: the number is a checkpoint index.
_INDEX_RE = re.compile(r"^ckpt_(\d+)$", re.IGNORECASE)
_NAME_COLUMNS = ("revision", "checkpoint")
_EXPECTED = "a CSV with a header row: revision (or checkpoint), step[, tokens]"


def checkpoint_name(checkpoint: Checkpoint) -> str:
    """The name a checkpoint is known by: its hub revision, else its folder or file name."""
    return checkpoint.revision or Path(checkpoint.path).name


def checkpoint_index(name: str) -> int | None:
    """The index in an LLM360-style ``ckpt_NNN`` name (``"ckpt_012"`` -> 12), else None."""
    match = _INDEX_RE.match(name.strip())
    return int(match.group(1)) if match else None


def _whole(text: str, path: Path, line: int, column: str) -> int | None:
    text = text.strip().replace("_", "")
    if not text:
        return None
    try:
        value = int(text) if text.isdigit() else int(float(text))
    except ValueError:
        raise ValueError(f"{path}: line {line}: {column} {text!r} is not a whole number; write it as digits") from None
    if not 0 <= value <= MAX_STEP:
        raise ValueError(f"{path}: line {line}: {column} {value} is not in 0..2**53; write the real {column}")
    return value


def read_step_map(path: str | Path) -> dict[str, tuple[int, int | None]]:
    """Read a step map: checkpoint name (revision or folder name) -> (step, tokens or None).

    Raises ValueError with one line naming the file and the fix for a missing file, a missing
    column, a step that is not a whole number, a name given twice or a file without rows.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"{path}: no such step map; pass {_EXPECTED}")
    check_not_lfs_pointer(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text file; pass {_EXPECTED}") from None
    reader = csv.DictReader(text.splitlines())
    fields = {(name or "").strip().lower(): name for name in reader.fieldnames or []}
    name_col = next((fields[c] for c in _NAME_COLUMNS if c in fields), None)
    if name_col is None or "step" not in fields:
        raise ValueError(f"{path}: needs columns revision (or checkpoint) and step; pass {_EXPECTED}")
    mapping: dict[str, tuple[int, int | None]] = {}
    for line, record in enumerate(reader, start=2):
        name = (record.get(name_col) or "").strip()
        if not name:
            continue
        step = _whole(record.get(fields["step"]) or "", path, line, "step")
        if step is None:
            raise ValueError(f"{path}: line {line}: {name} has no step; give every checkpoint its step")
        tokens = _whole(record.get(fields["tokens"]) or "", path, line, "tokens") if "tokens" in fields else None
        if name in mapping:
            raise ValueError(f"{path}: line {line}: {name} appears twice; keep one row per checkpoint")
        mapping[name] = (step, tokens)
    if not mapping:
        raise ValueError(f"{path}: no rows; pass {_EXPECTED}")
    return mapping


def _lookup(mapping: dict[str, tuple[int, int | None]], name: str) -> tuple[int, int | None] | None:
    """A map row by exact name, else by the checkpoint's index (``ckpt_012`` matches a row ``12``)."""
    if name in mapping:
        return mapping[name]
    index = checkpoint_index(name)
    if index is None:
        return None
    for key, value in mapping.items():
        if key.isdigit() and int(key) == index:
            return value
    return None


def _sorted_unique(checkpoints: list[Checkpoint], where: str) -> list[Checkpoint]:
    seen: dict[int, Checkpoint] = {}
    for c in checkpoints:
        if c.step in seen:
            raise ValueError(
                f"{where}: {checkpoint_name(seen[c.step])} and {checkpoint_name(c)} both map to step {c.step}; "
                "give each checkpoint its own step"
            )
        seen[c.step] = c
    return [seen[step] for step in sorted(seen)]


def apply_steps(run: Run, step_map: str | Path | None = None, steps_per_checkpoint: int | None = None) -> Run:
    """Give a run's checkpoints their real steps; warn (in ``run.problems``) where the names are indices.

    With ``step_map`` every checkpoint takes the step (and, when given, the tokens) of its row, found
    by its revision or folder name, or by its ``ckpt_NNN`` index; a checkpoint without a row is an
    error. With ``steps_per_checkpoint`` K, each ``ckpt_NNN`` checkpoint gets step NNN * K. Without
    either, a run with ``ckpt_NNN`` names keeps the indices as steps and gets one warning line.
    """
    if step_map is not None and steps_per_checkpoint is not None:
        raise ValueError("give --step-map or --steps-per-checkpoint, not both")
    indexed = [c for c in run.checkpoints if checkpoint_index(checkpoint_name(c)) is not None]
    if step_map is not None:
        mapping = read_step_map(step_map)
        moved, missing = [], []
        for c in run.checkpoints:
            row = _lookup(mapping, checkpoint_name(c))
            if row is None:
                missing.append(checkpoint_name(c))
                continue
            moved.append(replace(c, step=row[0], tokens=row[1] if row[1] is not None else c.tokens))
        if missing:
            raise ValueError(
                f"{step_map}: no row for {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                + "; add a row revision,step for every checkpoint"
            )  # fmt: skip
        run.checkpoints = _sorted_unique(moved, str(step_map))
        return run
    if steps_per_checkpoint is not None:
        if steps_per_checkpoint < 1:
            raise ValueError(f"--steps-per-checkpoint {steps_per_checkpoint}: give a whole number of steps >= 1")
        if not indexed:
            raise ValueError(
                f"{run.source}: no checkpoints named ckpt_NNN, which is what --steps-per-checkpoint maps; "
                "use --step-map FILE for other names"
            )
        moved = [
            replace(c, step=index * steps_per_checkpoint)
            if (index := checkpoint_index(checkpoint_name(c))) is not None
            else c
            for c in run.checkpoints
        ]
        if any(c.step > MAX_STEP for c in moved):
            raise ValueError(f"--steps-per-checkpoint {steps_per_checkpoint}: steps above 2**53; give the real value")
        run.checkpoints = _sorted_unique(moved, run.source)
        return run
    if indexed:
        run.problems.append(
            f"{run.source}: {len(indexed)} checkpoints are named ckpt_NNN (LLM360 style): checkpoint indices, "
            "not steps, registered with the index as their step; pass --step-map FILE (CSV: revision,step[,tokens]) "
            "or --steps-per-checkpoint K for the real steps"
        )
    return run
