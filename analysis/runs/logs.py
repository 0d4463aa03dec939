"""Training logs: HF Trainer state, CSV, JSON lines and TensorBoard events, read into one long frame.

Every reader returns a :class:`LogResult`: the frame (columns ``step`` int64, ``tokens`` Int64,
``metric`` string, ``value`` float64; see ``base.empty_log``) plus one-line problems about rows
it dropped (NaN or infinite values, rows without a step, broken JSON lines). A file that cannot
be used at all raises ValueError with one line naming the file and the fix.

Raw log keys become metric names by one rule for every format (:func:`metric_name`): names
with a ``/`` are kept; ``loss`` -> ``train/loss``; ``eval_loss``/``val_loss`` -> ``eval/loss``;
``lr``/``learning_rate`` -> ``train/learning_rate``; ``eval_<x>`` -> ``eval/<x>``; anything
else -> ``train/<key>``. Token counters (``tokens``, ``num_input_tokens_seen``, ...) fill the
``tokens`` column; bookkeeping keys (epoch, FLOPs, runtimes, throughputs) are skipped.
Within one log, a step logged twice for the same metric keeps its last value (a resumed run
logs its steps again), and rows are sorted by step.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.runs.base import MAX_STEP, Checkpoint, check_not_lfs_pointer, empty_log
from analysis.runs.local import parse_step_name

# Column names that hold the training step, most specific first.
STEP_KEYS = ("step", "global_step", "iteration", "iter", "_step")
TOKEN_KEYS = frozenset({"tokens", "num_tokens", "tokens_seen", "num_input_tokens_seen", "consumed_tokens"})
SKIP_KEYS = frozenset({"epoch", "total_flos", "flos", "timestamp", "_timestamp", "_runtime", "time", "wall_time"})
SKIP_SUFFIXES = ("runtime", "_per_second")
ALIASES = {
    "loss": "train/loss",
    "train_loss": "train/loss",
    "training_loss": "train/loss",
    "eval_loss": "eval/loss",
    "val_loss": "eval/loss",
    "valid_loss": "eval/loss",
    "validation_loss": "eval/loss",
    "lr": "train/learning_rate",
    "learning_rate": "train/learning_rate",
    "grad_norm": "train/grad_norm",
}
_EVAL_PREFIXES = ("eval_", "val_", "valid_", "validation_")
# The Trainer's last log entry carries the mean loss of the whole run as train_loss.
_TRAINER_SKIP = frozenset({"train_loss"})
_FORMATS = "use trainer_state.json, a .csv or .jsonl file with a step column, or TensorBoard events"


@dataclass
class LogResult:
    """A log in long form and one-line messages about rows that were dropped while reading it."""

    frame: pd.DataFrame = field(default_factory=empty_log)
    problems: list[str] = field(default_factory=list)


def _last_part(key: str) -> str:
    return key.strip().rsplit("/", 1)[-1].lower()


def is_step_key(key: str) -> bool:
    """Whether a column or tag holds the training step (``step``, ``trainer/global_step``, ...)."""
    return key.strip().lower() in STEP_KEYS or _last_part(key) in ("step", "global_step")


def is_tokens_key(key: str) -> bool:
    """Whether a column or tag counts training tokens seen so far."""
    return _last_part(key) in TOKEN_KEYS


def metric_name(key: str, skip: frozenset[str] = frozenset()) -> str | None:
    """The metric name for a raw log key, or None for steps, token counters and bookkeeping."""
    key = key.strip()
    last = _last_part(key)
    if not key or is_step_key(key) or is_tokens_key(key) or last in SKIP_KEYS or last.endswith(SKIP_SUFFIXES):
        return None
    if key.lower() in skip:
        return None
    if "/" in key:
        return key
    lower = key.lower()
    if lower in ALIASES:
        return ALIASES[lower]
    for prefix in _EVAL_PREFIXES:
        if lower.startswith(prefix):
            return "eval/" + key[len(prefix) :]
    if lower.startswith("train_"):
        return "train/" + key[len("train_") :]
    return "train/" + key


def _metric_names(
    keys: list[str], path: Path, problems: list[str], skip: frozenset[str] = frozenset()
) -> dict[str, str]:
    """Map raw keys to metric names; when two keys give the same name, keep the one spelled like it."""
    claims: dict[str, list[str]] = {}
    for key in dict.fromkeys(keys):
        name = metric_name(key, skip)
        if name is not None:
            claims.setdefault(name, []).append(key)
    names = {}
    for name, owners in claims.items():
        kept = name if name in owners else owners[0]
        names[kept] = name
        if len(owners) > 1:
            others = ", ".join(owner for owner in owners if owner != kept)
            problems.append(f"{path}: {kept} and {others} both mean {name}; kept {kept}")
    return names


def _pick_step_key(keys: list[str]) -> str | None:
    """The step column among ``keys``: exact names in STEP_KEYS order, then ``*/global_step``."""
    lowered = {key.strip().lower(): key for key in keys}
    for name in STEP_KEYS:
        if name in lowered:
            return lowered[name]
    return next((key for key in keys if is_step_key(key)), None)


def _normalise(long: pd.DataFrame) -> pd.DataFrame:
    """Fill tokens from other rows at the same step, keep the last row per (step, metric), sort, set dtypes."""
    if long.empty:
        return empty_log()
    tokens = pd.to_numeric(long["tokens"], errors="coerce").astype("float64")
    tokens = tokens.where(tokens.abs() <= MAX_STEP)  # a count beyond any real run is unknown, not an overflow
    steps = long["step"].astype("int64")
    by_step = tokens[np.isfinite(tokens)].groupby(steps[np.isfinite(tokens)]).last()
    tokens = tokens.where(np.isfinite(tokens), steps.map(by_step))
    frame = pd.DataFrame(
        {
            "step": steps.to_numpy(),
            "tokens": tokens.to_numpy(),
            "metric": long["metric"].astype(str).to_numpy(),
            "value": long["value"].astype("float64").to_numpy(),
        }
    )
    frame = frame.drop_duplicates(["step", "metric"], keep="last")
    frame = frame.sort_values(["step", "metric"], kind="stable").reset_index(drop=True)
    return pd.DataFrame(
        {
            "step": frame["step"].astype("int64"),
            "tokens": pd.array(frame["tokens"].round(), dtype="Int64"),
            "metric": frame["metric"].astype("string"),
            "value": frame["value"].astype("float64"),
        }
    )


def _finish(long: pd.DataFrame, path: Path, problems: list[str]) -> LogResult:
    """Drop rows without a whole-number step or with a non-finite value (reporting them), then normalise."""
    steps = pd.to_numeric(long["step"], errors="coerce").astype("float64")
    good_step = np.isfinite(steps) & (steps == np.round(steps)) & (steps.abs() <= MAX_STEP)
    if (~good_step).any():
        problems.append(f"{path}: skipped {int((~good_step).sum())} values without a whole-number step up to 2**53")
    long = long[good_step].assign(step=steps[good_step])
    values = long["value"].astype("float64")
    finite = np.isfinite(values)
    if (~finite).any():
        counts = long.loc[~finite, "metric"].value_counts().sort_index()
        detail = ", ".join(f"{metric}: {count}" for metric, count in counts.items())
        problems.append(f"{path}: dropped {int((~finite).sum())} NaN or infinite values ({detail})")
    return LogResult(_normalise(long[finite]), problems)


def _long(steps, tokens, metric: str, values) -> pd.DataFrame:
    return pd.DataFrame({"step": steps, "tokens": tokens, "metric": metric, "value": values})


def _read_csv(path: Path, sep: str) -> LogResult:
    try:
        table = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, skipinitialspace=True)
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path}: empty file; {_FORMATS}") from None
    except (UnicodeDecodeError, pd.errors.ParserError) as err:
        first = str(err).strip().splitlines()[0]
        raise ValueError(f"{path}: not a readable CSV file ({first}); export the log as plain-text CSV") from None
    keys = [str(column) for column in table.columns]
    step_key = _pick_step_key(keys)
    if step_key is None:
        raise ValueError(
            f"{path}: no step column (looked for {', '.join(STEP_KEYS)}); "
            "rename the column that holds the training step to 'step'"
        )
    if table.empty:
        return LogResult(empty_log(), [f"{path}: no rows yet"])
    steps = pd.to_numeric(table[step_key].str.strip(), errors="coerce")
    tokens_key = next((key for key in keys if is_tokens_key(key)), None)
    tokens = pd.to_numeric(table[tokens_key], errors="coerce") if tokens_key else pd.Series(np.nan, index=table.index)
    parts: list[pd.DataFrame] = []
    problems: list[str] = []
    for key, name in _metric_names(keys, path, problems).items():
        cells = table[key].str.strip()
        present = cells != ""
        values = pd.to_numeric(cells, errors="coerce")
        unparsed = values.isna() & present & ~cells.str.lower().isin(["nan", "-nan", "+nan"])
        if unparsed.sum() * 2 > present.sum():
            continue  # a text column (run names, dates), not a metric
        parts.append(_long(steps[present], tokens[present], name, values[present]))
    if not parts:
        raise ValueError(f"{path}: no numeric columns besides '{step_key}'; add columns such as loss or eval_loss")
    return _finish(pd.concat(parts, ignore_index=True), path, problems)


def _flatten(record: dict, prefix: str = "") -> dict:
    """Nested dicts become ``outer/inner`` keys (W&B-style histories)."""
    flat = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "/"))
        else:
            flat[name] = value
    return flat


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _as_float(value: int | float) -> float:
    """A JSON number as a float; an integer too big for one becomes infinite (and is then dropped)."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def _from_records(
    records: list[dict], path: Path, problems: list[str], skip: frozenset[str] = frozenset()
) -> LogResult:
    """Long rows from a list of log entries, each a dict holding a step and numeric values."""
    steps, tokens, metrics, values = [], [], [], []
    found_step = False
    without_step = 0
    flats = [_flatten(record) for record in records]
    names = _metric_names([key for flat in flats for key in flat], path, problems, skip)
    for flat in flats:
        step_key = _pick_step_key(list(flat))
        found_step = found_step or step_key is not None
        if step_key is None or not _is_number(flat[step_key]):
            without_step += 1
            continue
        token_key = next((key for key in flat if is_tokens_key(key) and _is_number(flat[key])), None)
        for key, value in flat.items():
            name = names.get(key)
            if name is None or not _is_number(value):
                continue
            steps.append(_as_float(flat[step_key]))
            tokens.append(_as_float(flat[token_key]) if token_key else math.nan)
            metrics.append(name)
            values.append(_as_float(value))
    if not found_step:
        raise ValueError(
            f"{path}: no step field (looked for {', '.join(STEP_KEYS)}); log the training step as 'step' in every entry"
        )
    if without_step:
        problems.append(f"{path}: skipped {without_step} entries without a numeric step")
    if not values:
        raise ValueError(f"{path}: no numeric values besides the step; log metrics such as loss or eval_loss")
    long = pd.DataFrame({"step": steps, "tokens": tokens, "metric": metrics, "value": values})
    return _finish(long, path, problems)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text file; {_FORMATS}") from None


def _read_json_lines(path: Path, text: str) -> LogResult:
    records, broken, first_broken = [], 0, 0
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError):  # RecursionError: nested too deep to be a log
            record = None
        if not isinstance(record, dict):
            broken += 1
            first_broken = first_broken or number
            continue
        records.append(record)
    if not records:
        raise ValueError(f"{path}: not JSON lines (no line is a JSON object); {_FORMATS}")
    problems = []
    if broken:
        problems.append(f"{path}: skipped {broken} lines that are not JSON objects (first: line {first_broken})")
    return _from_records(records, path, problems)


def _read_trainer_state(path: Path, state: object) -> LogResult:
    history = state.get("log_history") if isinstance(state, dict) else None
    if not isinstance(history, list):
        raise ValueError(f"{path}: no log_history list; pass the trainer_state.json that transformers.Trainer saves")
    entries = [entry for entry in history if isinstance(entry, dict)]
    if not entries:
        return LogResult(empty_log(), [f"{path}: log_history is empty"])
    return _from_records(entries, path, [], skip=_TRAINER_SKIP)


def _read_json(path: Path) -> LogResult:
    text = _read_text(path)
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return _read_json_lines(path, text)  # a .json file written one object per line
    if path.name == "trainer_state.json" or (isinstance(data, dict) and "log_history" in data):
        return _read_trainer_state(path, data)
    if isinstance(data, list) and data and all(isinstance(entry, dict) for entry in data):
        return _from_records(data, path, [])
    raise ValueError(f"{path}: JSON but not a log (expected a list of entries or a log_history); {_FORMATS}")


def _tensorboard_rows(file: Path) -> list[tuple[int, str, float]]:
    """(step, tag, value) for every scalar in one events file, simple values and scalar tensors alike."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.compat.tensorflow_stub.errors import OpError
    from tensorboard.util import tensor_util

    check_not_lfs_pointer(file)  # else tensorboard reads it as an events file with no scalars
    accumulator = EventAccumulator(str(file), size_guidance={"scalars": 0, "tensors": 0})
    try:
        accumulator.Reload()
    except (OSError, ValueError, OpError) as err:
        raise ValueError(f"{file}: unreadable TensorBoard events ({err}); copy the file again") from None
    tags = accumulator.Tags()
    rows = [(event.step, tag, event.value) for tag in tags["scalars"] for event in accumulator.Scalars(tag)]
    for tag in tags["tensors"]:
        if accumulator.SummaryMetadata(tag).plugin_data.plugin_name != "scalars":
            continue
        for event in accumulator.Tensors(tag):
            array = tensor_util.make_ndarray(event.tensor_proto)
            if array.size == 1:
                rows.append((event.step, tag, float(array.reshape(-1)[0])))
    return rows


def _read_tensorboard(path: Path) -> LogResult:
    files = sorted(path.rglob("*tfevents*")) if path.is_dir() else [path]
    rows = [row for file in files if file.is_file() for row in _tensorboard_rows(file)]
    tokens_at = {step: value for step, tag, value in rows if is_tokens_key(tag)}
    problems: list[str] = []
    names = _metric_names([tag for _, tag, _ in rows], path, problems)
    kept = [(step, names[tag], value) for step, tag, value in rows if tag in names]
    if not kept:
        raise ValueError(f"{path}: no scalar values in the TensorBoard events; log scalars with add_scalar")
    long = pd.DataFrame(
        {
            "step": [step for step, _, _ in kept],
            "tokens": [tokens_at.get(step, math.nan) for step, _, _ in kept],
            "metric": [name for _, name, _ in kept],
            "value": [value for _, _, value in kept],
        }
    )
    return _finish(long, path, problems)


def read_log(path: str | Path) -> LogResult:
    """Read one training log into a long frame, with the rows it had to drop listed in ``problems``.

    The format follows the name: ``trainer_state.json``, ``.csv``/``.tsv``, ``.jsonl``/``.ndjson``,
    other ``.json`` (a list of entries, a log_history, or JSON lines), ``events.out.tfevents.*``,
    or a folder holding TensorBoard event files. Raises ValueError (one line naming the file and
    the fix) for a missing file, a Git LFS pointer in place of the file, an unknown format,
    unparsable content, no step column or no numeric values.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise ValueError(f"{path}: no such file; check the path of the training log")
    if path.is_dir():
        if any(path.rglob("*tfevents*")):
            return _read_tensorboard(path)
        if (path / "trainer_state.json").is_file():
            check_not_lfs_pointer(path / "trainer_state.json")
            return _read_json(path / "trainer_state.json")
        raise ValueError(f"{path}: a folder without TensorBoard events or trainer_state.json; pass the log file")
    check_not_lfs_pointer(path)  # a clone without git-lfs: the pointer would read as a log with no values
    name = path.name.lower()
    if "tfevents" in name:
        return _read_tensorboard(path)
    if name.endswith(".csv"):
        return _read_csv(path, ",")
    if name.endswith(".tsv"):
        return _read_csv(path, "\t")
    if name.endswith((".jsonl", ".ndjson")):
        return _read_json_lines(path, _read_text(path))
    if name.endswith(".json"):
        return _read_json(path)
    raise ValueError(f"{path}: unknown log format; {_FORMATS}")


def _skip_dir(folder: Path, checkpoint_dirs: set[Path]) -> bool:
    return folder.name.startswith(".") or folder in checkpoint_dirs or parse_step_name(folder.name) is not None


def _events_files(root: Path, checkpoint_dirs: set[Path], max_depth: int = 4) -> list[Path]:
    """TensorBoard event files under ``root``, not looking inside checkpoint folders."""
    found: list[Path] = []
    for current, dirs, files in os.walk(root):
        here = Path(current)
        depth = len(here.relative_to(root).parts)
        dirs[:] = [] if depth >= max_depth else sorted(d for d in dirs if not _skip_dir(here / d, checkpoint_dirs))
        found.extend(here / name for name in sorted(files) if "tfevents" in name)
    return found


def find_logs(run_root: str | Path, checkpoints: list[Checkpoint]) -> list[Path]:
    """The training logs of a local run, in merge order (a later one wins on the same step and metric).

    TensorBoard event files under the run folder (not inside checkpoint folders), then
    ``*.csv``/``*.tsv``/``*.jsonl`` files directly in it, then the latest checkpoint's
    trainer_state.json (it holds the whole history), then a trainer_state.json in the run folder.
    """
    root = Path(run_root).expanduser().resolve()
    checkpoint_dirs = {Path(c.path) for c in checkpoints if Path(c.path).is_dir()}
    logs = _events_files(root, checkpoint_dirs) if root.is_dir() else []
    if root.is_dir():
        logs += sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in (".csv", ".tsv", ".jsonl"))
    folders = [c for c in checkpoints if Path(c.path).is_dir()]
    if folders:
        latest = Path(max(folders, key=lambda c: c.step).path) / "trainer_state.json"
        if latest.is_file():
            logs.append(latest)
    if (root / "trainer_state.json").is_file():
        logs.append(root / "trainer_state.json")
    return list(dict.fromkeys(logs))


def merge_logs(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """Combine log frames; a later frame wins for the same (step, metric), tokens are shared by step."""
    frames = [frame for frame in frames if not frame.empty]
    if not frames:
        return empty_log()
    return _normalise(pd.concat(frames, ignore_index=True))
