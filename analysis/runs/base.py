"""The two records every run source produces: a checkpoint and a run."""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

# Columns of a run's training log in long form: one row per (step, metric).
LOG_COLUMNS = ["step", "tokens", "metric", "value"]

# The largest step or token count accepted anywhere: logs hold them as float64, exact up to 2**53,
# and the cache as BIGINT. No real run comes near it; a bigger number is a corrupt or foreign file.
MAX_STEP = 2**53


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
