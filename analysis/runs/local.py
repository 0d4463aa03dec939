"""Local run folders: find the checkpoints in the layouts training code leaves behind.

Recognised layouts, inside a run folder:

- one folder per checkpoint, named by step: ``checkpoint-200/`` (HF Trainer), ``step_200/``,
  ``step200/``, ``global_step200/``, ``iter_0000200/``, ``ckpt-200/``, ``200/``, and OLMo style
  ``step200-tokens4B/`` or ``stage1-step200-tokens4194M/`` (tokens with an optional K/M/B/T suffix;
  the whole grammar is in ``analysis.runs.stepnames``);
- one weights file per checkpoint beside a single shared ``config.json``: ``step_200.safetensors``,
  ``model_step200.bin``, ``200.safetensors``. Such a checkpoint's ``path`` is the weights file.
  To load it, :func:`as_model_folder` links the shared config and tokenizer files and that
  weights file (as ``model.safetensors`` or ``pytorch_model.bin``) into a scratch folder that
  ``from_pretrained`` reads like any other; a plain ``load_state_dict`` is not enough, because
  transformers converts some saved layouts on load (fused MoE experts, for one);
- the run folder itself being one model folder (config.json directly inside, nothing named by
  step): one checkpoint whose step comes from the folder's name, or 0.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
from pathlib import Path

from analysis.runs.base import MAX_STEP, NO_WEIGHTS_PREFIX, Checkpoint, check_not_lfs_pointer, lfs_pointer_problem
from analysis.runs.stepnames import WEIGHT_SUFFIXES, parse_step_name  # the grammar; still importable from here

# Files that decide what a checkpoint computes; training state (optimizer, RNG, trainer_state.json)
# and logs are left out of the fingerprint so that they can change without invalidating results.
_SIDECAR_PREFIXES = (
    "config.json",
    "generation_config.json",
    "tokenizer",
    "special_tokens_map",
    "added_tokens",
    "vocab",
    "merges",
)

# A safetensors header above this size is certainly corruption, not a real header.
_MAX_HEADER_BYTES = 100_000_000


def is_weights_file(path: Path) -> bool:
    """Whether a file holds model weights (not optimizer or trainer state)."""
    name = path.name.lower()
    if name.endswith(".safetensors"):
        return True
    return name.endswith(".bin") and (name.startswith(("pytorch_model", "model")) or parse_step_name(name) is not None)


def checkpoint_parts(path: str | Path) -> tuple[Path, Path | None]:
    """Split a checkpoint path into (folder with config.json and tokenizer, single weights file or None).

    For a checkpoint folder the second item is None. For a file-per-step checkpoint it is the
    weights file and the folder is its parent; :func:`as_model_folder` turns the pair into one
    loadable folder.
    """
    path = Path(path)
    if path.is_file():
        return path.parent, path
    return path, None


def as_model_folder(path: str | Path, scratch: str | Path) -> Path:
    """A folder that ``from_pretrained`` can load for any checkpoint path from :func:`discover_checkpoints`.

    A checkpoint folder is returned as is. For a file-per-step checkpoint, ``scratch/<file stem>/``
    is filled with links to the parent's config and tokenizer files and to the weights file
    under its standard name (copies where links are not allowed) and returned.
    """
    folder, weights = checkpoint_parts(path)
    if weights is None:
        return folder
    target = Path(scratch) / weights.name.rsplit(".", 1)[0]
    target.mkdir(parents=True, exist_ok=True)
    standard = "model.safetensors" if weights.name.endswith(".safetensors") else "pytorch_model.bin"
    links = {p.name: p for p in folder.iterdir() if p.is_file() and p.name.startswith(_SIDECAR_PREFIXES)}
    links[standard] = weights
    for name, source in links.items():
        link = target / name
        if link.is_symlink() or link.exists():
            link.unlink()
        try:
            os.symlink(source.resolve(), link)
        except OSError:
            shutil.copy2(source, link)
    return target


def _header_bytes(path: Path) -> bytes:
    """Read and check a safetensors header; raises ValueError with the bare reason."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise ValueError(f"truncated safetensors file ({size} bytes)")
        (length,) = struct.unpack("<Q", head)
        if length > min(size - 8, _MAX_HEADER_BYTES):
            raise ValueError("truncated or corrupt safetensors header")
        raw = handle.read(length)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError("safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise ValueError("safetensors header is not a JSON object")
    ends = [
        entry["data_offsets"][1]
        for key, entry in header.items()
        if key != "__metadata__" and isinstance(entry, dict) and len(entry.get("data_offsets", ())) == 2
    ]
    if ends and 8 + length + max(ends) > size:
        raise ValueError("truncated safetensors file (its tensors run past the end)")
    return raw


def read_safetensors_header(path: str | Path) -> bytes:
    """The raw JSON header of a safetensors file, checked against the file's size.

    Reads only the header (the first 8 bytes give its length). Raises ValueError when the
    header cannot be parsed or the tensors it lists run past the end of the file.
    """
    path = Path(path)
    check_not_lfs_pointer(path)
    try:
        return _header_bytes(path)
    except ValueError as err:
        raise ValueError(f"{path}: {err}; copy or save it again") from None


def _pickle_problem(path: Path) -> str | None:
    """Why a pickled ``.bin`` is refused, or None when it holds only tensors; nothing in it is run.

    torch's weights-only unpickler (what transformers loads ``.bin`` with) reads the pickle and
    rejects anything outside its allowlist without calling it. With mmap only the pickle is read,
    not the tensors.
    """
    import pickle
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns about the pickle protocol of files it then rejects
        try:
            try:
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as err:
                if "mmap" not in str(err):
                    raise
                torch.load(path, map_location="cpu", weights_only=True)  # the legacy (non-zip) format
        except pickle.UnpicklingError as err:
            called = re.search(r"GLOBAL (\S+)", str(err))
            what = f"it would call {called.group(1)}" if called else "it is not a plain pickle of tensors"
            return f"refused: the weights-only loader rejects it ({what}); convert a trusted copy to safetensors"
        except (RuntimeError, EOFError) as err:
            return f"unreadable ({str(err).strip().splitlines()[0]}); copy or save it again"
    return None


def check_weights_only(path: str | Path) -> None:
    """Raise ValueError (one line naming the file) unless a ``.bin`` weights file holds only tensors."""
    check_not_lfs_pointer(path)
    problem = _pickle_problem(Path(path))
    if problem is not None:
        raise ValueError(f"{path}: {problem}")


def _model_files(path: Path) -> list[Path]:
    """The files a checkpoint's fingerprint covers: weights, config and tokenizer files."""
    if path.is_file():
        siblings = [p for p in path.parent.iterdir() if p.is_file() and p.name.startswith(_SIDECAR_PREFIXES)]
        return sorted([path, *siblings])
    return sorted(p for p in path.iterdir() if p.is_file() and _is_model_file(p))


def _is_model_file(path: Path) -> bool:
    """Weights, weight index, config or tokenizer file."""
    return is_weights_file(path) or path.name.endswith(".index.json") or path.name.startswith(_SIDECAR_PREFIXES)


def fingerprint(path: str | Path) -> str:
    """A content fingerprint of a checkpoint folder or file-per-step checkpoint.

    A sha256 over each model file's name, size and mtime (ns), plus a sha256 of each
    safetensors header; weights are never read in full. Training state and logs are not
    covered. Raises ValueError for a missing path or an unreadable safetensors header.
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: no such checkpoint; check the path")
    entries = []
    for file in _model_files(path):
        stat = file.stat()
        entry = [file.name, stat.st_size, stat.st_mtime_ns]
        if file.name.endswith(".safetensors"):
            entry.append(hashlib.sha256(read_safetensors_header(file)).hexdigest())
        entries.append(entry)
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


def _check_config(folder: Path) -> str | None:
    """A problem with ``folder/config.json``, or None when it reads as a JSON object."""
    config = folder / "config.json"
    if not config.is_file():
        return "no config.json; skipped (save it with save_pretrained)"
    if (pointer := lfs_pointer_problem(config)) is not None:
        return f"{pointer} (checkpoint skipped)"
    try:
        parsed = json.loads(config.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "config.json is not valid JSON; skipped (save it again with save_pretrained)"
    if not isinstance(parsed, dict):
        return "config.json is not a JSON object; skipped (save it again with save_pretrained)"
    return None


def _check_weights(files: list[Path]) -> str | None:
    """A problem with a checkpoint's weights files, or None when they look complete."""
    if not files:
        return "no weights (*.safetensors or pytorch_model*.bin); skipped (save it with save_pretrained)"
    for file in files:
        if (pointer := lfs_pointer_problem(file)) is not None:
            return f"{pointer} (checkpoint skipped)"
        if file.stat().st_size == 0:
            return f"{file.name} is empty; skipped (copy or save it again)"
        if file.name.endswith(".safetensors"):
            try:
                _header_bytes(file)
            except ValueError as err:
                return f"{file.name}: {err}; skipped (copy or save it again)"
        elif (problem := _pickle_problem(file)) is not None:
            return f"{file.name}: {problem}; skipped"
    return None


def is_weightless(folder: Path) -> bool:
    """Whether a checkpoint folder holds a Trainer's ``trainer_state.json`` but no weights files at all.

    Published Trainer runs are often shared this way: every ``checkpoint-N/`` keeps its state and log,
    only the weights were left out.
    """
    try:
        files = [p for p in folder.iterdir() if p.is_file()]
    except OSError:
        return False
    return any(p.name == "trainer_state.json" for p in files) and not any(is_weights_file(p) for p in files)


def _make_checkpoint(path: Path, step: int, tokens: int | None, problems: list[str]) -> Checkpoint | None:
    """Validate one candidate and build its Checkpoint, or record why it is skipped."""
    folder, weights_file = checkpoint_parts(path)
    if weights_file is None and is_weightless(folder):
        # Listed (its step, its log), never evaluated: the fingerprint says there are no weights to match.
        return Checkpoint(step=step, path=str(path), tokens=tokens, fingerprint=f"{NO_WEIGHTS_PREFIX}{path.name}")
    problem = _check_config(folder)
    if problem is None:
        if weights_file is not None:
            weights = [weights_file]
        else:
            weights = sorted(p for p in folder.iterdir() if p.is_file() and is_weights_file(p))
        try:
            problem = _check_weights(weights)
        except OSError as err:
            problem = f"cannot read its weights ({err}); skipped (check the files and their permissions)"
    if problem is not None:
        problems.append(f"{path}: {problem}")
        return None
    try:
        stamp = fingerprint(path)
    except (OSError, ValueError) as err:
        problems.append(f"{path}: cannot read ({err}); skipped (check the files and their permissions)")
        return None
    return Checkpoint(step=step, path=str(path), tokens=tokens, fingerprint=stamp)


def _candidates(root: Path, problems: list[str]) -> list[tuple[int, int | None, Path]]:
    """Step-named folders and step-named weights files directly inside ``root``."""
    found: list[tuple[int, int | None, Path]] = []
    orphans: list[tuple[int, int | None, Path]] = []
    shared_config = (root / "config.json").is_file()
    for child in sorted(root.iterdir()):
        if child.name.startswith("."):
            continue
        parsed = parse_step_name(child.name)
        if parsed is None:
            continue
        if max(parsed[0], parsed[1] or 0) > MAX_STEP:
            problems.append(f"{child}: step or token count above 2**53; skipped (rename it with the real step)")
            continue
        if child.is_dir() and not child.name.lower().endswith(WEIGHT_SUFFIXES):
            found.append((*parsed, child))
        elif child.is_file() and is_weights_file(child):
            (found if shared_config else orphans).append((*parsed, child))
    if orphans:
        problems.append(
            f"{root}: {len(orphans)} step-named weights files but no config.json beside them; skipped "
            "(save the model's config there with config.save_pretrained)"
        )
    return found


def discover_checkpoints(root: str | Path) -> tuple[list[Checkpoint], list[str]]:
    """Find the checkpoints of a local run folder.

    Returns the usable checkpoints sorted by step (absolute paths) and one-line problems
    about the rest: missing or broken config.json, missing or truncated weights, Git LFS
    pointers in place of files, a step that appears twice (the first path in name order is
    kept). A folder with a ``trainer_state.json`` and no weights at all is returned with a
    ``no-weights:`` fingerprint (see ``base.NO_WEIGHTS_PREFIX``), and one line says so. Raises ValueError when
    ``root`` does not exist or is a file.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise ValueError(f"{root}: no such folder; pass the folder that holds the run's checkpoints")
    if not root.is_dir():
        raise ValueError(f"{root}: is a file, not a folder; pass the folder that holds the run's checkpoints")
    root = root.resolve()
    problems: list[str] = []
    candidates = _candidates(root, problems)
    if not candidates and (root / "config.json").exists():
        step, tokens = parse_step_name(root.name) or (0, None)
        if max(step, tokens or 0) > MAX_STEP:
            raise ValueError(f"{root}: step or token count above 2**53 in its name; rename it with the real step")
        candidates = [(step, tokens, root)]
    if not candidates:
        return [], problems or [
            f"{root}: no checkpoints found; expected checkpoint-N/ or step_N/ folders, "
            "step-named weights files beside a config.json, or a model folder"
        ]
    by_step: dict[int, Checkpoint] = {}
    for step, tokens, path in candidates:
        checkpoint = _make_checkpoint(path, step, tokens, problems)
        if checkpoint is None:
            continue
        kept = by_step.get(step)
        if kept is not None:
            first = Path(kept.path).name
            problems.append(f"{root}: step {step} appears twice ({first}, {path.name}); kept {first}")
            continue
        by_step[step] = checkpoint
    weightless = sorted(step for step, c in by_step.items() if c.fingerprint.startswith(NO_WEIGHTS_PREFIX))
    if weightless:
        span = f"step {weightless[0]}" if len(weightless) == 1 else f"steps {weightless[0]}..{weightless[-1]}"
        problems.append(
            f"{root}: {len(weightless)} of {len(by_step)} checkpoints ({span}) have no weights here, only "
            "trainer_state.json: registered with their training log but they cannot be evaluated; "
            "download the weights into those folders and run add-run again"
        )
    return [by_step[step] for step in sorted(by_step)], problems
