"""The two records every run source produces: a checkpoint and a run."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

# Columns of a run's training log in long form: one row per (step, metric).
LOG_COLUMNS = ["step", "tokens", "metric", "value"]

# The largest step or token count accepted anywhere: logs hold them as float64, exact up to 2**53,
# and the cache as BIGINT. No real run comes near it; a bigger number is a corrupt or foreign file.
MAX_STEP = 2**53

# The fingerprint prefix of a checkpoint whose weights are not on this machine (a published Trainer folder
# that kept only trainer_state.json): listed with its step and log, never evaluated. The name after the
# prefix is the checkpoint folder's, so registering the same folder again changes nothing.
NO_WEIGHTS_PREFIX = "no-weights:"

# What every Git LFS pointer file starts with: a clone made without git-lfs holds these ~130-byte text files
# where the weights, event files or logs should be.
LFS_POINTER_HEAD = b"version https://git-lfs.github.com/spec/v1"
_LFS_POINTER_MAX_BYTES = 1024  # a pointer is a few lines; anything bigger is the real file


def lfs_pointer_problem(path: str | Path) -> str | None:
    """The one-line message for a Git LFS pointer file at ``path``, or None when it is not one (or unreadable)."""
    path = Path(path)
    try:
        if not path.is_file() or path.stat().st_size > _LFS_POINTER_MAX_BYTES:
            return None
        with path.open("rb") as handle:
            head = handle.read(len(LFS_POINTER_HEAD))
    except OSError:
        return None
    if head != LFS_POINTER_HEAD:
        return None
    return (
        f"{path} is a Git LFS pointer, not the file itself; fetch it with `git lfs pull` (or download it) and try again"
    )


def check_not_lfs_pointer(path: str | Path) -> None:
    """Raise ValueError with the one-line message when ``path`` is a Git LFS pointer instead of the file."""
    problem = lfs_pointer_problem(path)
    if problem is not None:
        raise ValueError(problem)


def empty_log() -> pd.DataFrame:
    """A log frame with no rows and the right columns and dtypes."""
    return pd.DataFrame(
        {
            "step": pd.Series(dtype="int64"),
            "tokens": pd.Series(dtype="Int64"),
            "metric": pd.Series(dtype="string"),
            "value": pd.Series(dtype="float64"),
        }
    )


@dataclass(frozen=True)
class Checkpoint:
    """One intermediate checkpoint of a run.

    ``path`` is an absolute local folder (a transformers model folder) or, for hub
    sources, ``hf://<repo_id>@<revision>``. ``fingerprint`` changes whenever the
    checkpoint's content changes, which invalidates its cached results.
    """

    step: int
    path: str
    tokens: int | None = None
    fingerprint: str = ""
    revision: str | None = None


@dataclass
class Run:
    """A named series of checkpoints with an optional training log.

    ``problems`` collects one-line messages about parts that could not be used
    (a checkpoint without config.json, an unreadable log); the rest of the run is
    still usable.
    """

    name: str
    source: str  # the folder or hub repo it came from
    checkpoints: list[Checkpoint] = field(default_factory=list)
    log: pd.DataFrame = field(default_factory=empty_log)
    problems: list[str] = field(default_factory=list)
    config: dict = field(default_factory=dict)  # free-form settings shown in the UI
