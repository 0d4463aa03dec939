"""What a job asks for, and the items each checkpoint unit computes.

A job = (run, checkpoints, evaluations, parameters). It is split into one unit per
checkpoint; a unit is a list of items (one lm-eval task, one held-out probe set, one internal
metric, ...). Each item knows the parameters that determine its result (hashed into the cache
key) and which stored metric names it produces, so the runner can tell what is cached without
loading anything.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

from analysis.jobs.task_digest import builtin_task_digest, yaml_task_digest, yaml_task_names
from analysis.store import params_hash

# Evaluations that are not lm-eval tasks or registry metrics.
HELDOUT = "heldout_loss"
PROXY = "proxy"
# Per-sample loss and expert pathway of every probe sample, stored per checkpoint, from which the
# memorisation groups and the pathway metrics inside them are read (analysis/memorisation.py).
MEMORISATION = "memorisation"

DEFAULT_PROBES = Path("data/probes/modarith")
# Bump when analysis/evals/heldout.py changes what it reports, so cached held-out rows are recomputed.
# 2: stderr of the token-weighted loss as a ratio estimator over sequences.
# 3: text whose tokenizer adds no BOS is scored from a BOS/EOS prefix; bytes = bytes of scored tokens.
HELDOUT_VERSION = "3"


def file_digest(path: str | Path) -> str:
    """sha256 of a file, or of every file under a folder (names and contents), short form."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: no such file or folder; pass --data with a JSONL/txt probe file or folder")
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        digest.update(str(file.relative_to(path.parent if path.is_file() else path)).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class JobSpec:
    """One request: which checkpoints of which run, and what to compute on each.

    ``steps`` None means every registered checkpoint. ``metrics`` holds ``heldout_loss``,
    ``proxy`` (token-level proxies over the bundled tasks' solutions) and registry metric
    names (``hessian_trace``, ...). ``metric_params`` are key=value settings per metric; a
    metric's ``seed`` there overrides ``seed`` for that metric.
    """

    run: str
    steps: tuple[int, ...] | None = None
    tasks: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ()
    data: str | None = None  # probe set for heldout_loss and internal metrics
    limit: int | None = None  # lm-eval documents per task (None: all)
    num_fewshot: int | None = None
    batch_size: int = 16
    max_length: int = 64
    max_samples: int | None = 256  # probe samples used (the first N: fixed across checkpoints)
    metric_batches: int = 2  # fixed probe batches the internal metrics use
    seed: int = 0
    device: str = "auto"
    dtype: str | None = None  # None: the checkpoint's own dtype
    log_samples: bool = True
    bootstrap_iters: int = 1000
    metric_params: dict[str, dict[str, str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.tasks and not self.metrics:
            raise ValueError("nothing to compute: pass --tasks and/or --metrics")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit {self.limit}: must be at least 1")
        if self.batch_size < 1 or self.max_length < 2:
            raise ValueError("batch size must be >= 1 and max length >= 2")
        if self.dtype not in (None, "float32", "bfloat16", "float16"):
            raise ValueError(f"--dtype {self.dtype}: use float32, bfloat16 or float16")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> JobSpec:
        data = dict(data)
        for key in ("steps", "tasks", "metrics"):
            if data.get(key) is not None:
                data[key] = tuple(data[key])
        return cls(**data)


@dataclass(frozen=True)
class Item:
    """One thing computed on a checkpoint. ``params`` are everything that shapes its result."""

    kind: str  # the name of a registered work kind (analysis/jobs/kinds): "lm_eval", "heldout", "metric", ...
    name: str
    params: dict
    # lm_eval: the task names its results are stored under, when not ``name`` (a YAML path
    # stores under the YAML's task name). Not a parameter: it does not shape the result.
    scopes: tuple[str, ...] = ()
    # The probe set's absolute path, for items that read it. Not a parameter either: its content
    # digest is one (``probe_params``), so the same data at another path is the same result.
    data: str | None = None

    @property
    def params_hash(self) -> str:
        return params_hash(self.params)

    @property
    def label(self) -> str:
        from analysis.jobs.kinds import get_kind

        return get_kind(self.kind).label(self)

    def produces(self, metric: str) -> bool:
        """Whether a stored metric name comes from this item."""
        from analysis.jobs.kinds import get_kind

        return get_kind(self.kind).produces(self, metric)

    def is_cached(self, keys: set[tuple[str, str]]) -> bool:
        h = self.params_hash
        return any(kh == h and self.produces(m) for m, kh in keys)


def _task_digest(task: str) -> str:
    """Content hash of what a task reads, so edited task data is recomputed and nothing else is.

    Bundled tasks: their data folder (project data, nothing else lives there). Task YAMLs: the
    YAML, its includes and the data files it names, not its folder, where caches and logs often
    sit (analysis/jobs/task_digest.py). Built-in names: the name and the lm-eval version.
    """
    # The same path-or-name rule resolve_tasks applies, so both agree on what a spec is.
    from analysis.evals.tasks import BUNDLED_TASKS, DEFAULT_DATA_DIR, _looks_like_path

    if task in BUNDLED_TASKS:
        return file_digest(DEFAULT_DATA_DIR / BUNDLED_TASKS[task].folder)
    if _looks_like_path(task):
        return yaml_task_digest(task)
    return builtin_task_digest(task)


def _task_scopes(task: str) -> tuple[str, ...]:
    """Task names a task spec's results are stored under: the YAML's task names for a path, else none."""
    from analysis.evals.tasks import BUNDLED_TASKS, _looks_like_path

    return yaml_task_names(task) if task not in BUNDLED_TASKS and _looks_like_path(task) else ()


def probe_data(spec: JobSpec) -> str:
    """The probe set a job's held-out loss and internal metrics read: ``--data``, else the bundled one."""
    return spec.data or str(DEFAULT_PROBES)


def probe_path(spec: JobSpec) -> str:
    """Where a unit reads the probe set: ``probe_data`` made absolute, so a worker in another folder finds it."""
    return str(Path(probe_data(spec)).resolve())


def probe_params(spec: JobSpec) -> dict:
    """The cache parameters every item that reads the probe set shares: which data, its digest, how much of it.

    The data is named by its file or folder name, not its path: the digest says "same data", so
    results computed in one checkout (the shipped demo results, a colleague's cache) are cache hits
    in another. The path a unit reads travels beside the parameters (``Item.data``).
    """
    data = probe_data(spec)
    return {
        "data": Path(data).resolve().name,
        "data_digest": file_digest(data),
        "max_length": spec.max_length,
        "max_samples": spec.max_samples,
    }


def plan_items(spec: JobSpec) -> list[Item]:
    """The items every checkpoint unit of ``spec`` computes, with their cache parameters.

    Each task and each ``--metrics`` name is planned by the work kind that claims it
    (analysis/jobs/kinds); an unknown name is a KeyError with "did you mean".
    """
    from analysis.jobs.kinds import get_kind, kind_for_request

    items: list[Item] = []
    for task in spec.tasks:
        items += get_kind("lm_eval").plan(spec, task)
    for metric in spec.metrics:
        items += kind_for_request(metric).plan(spec, metric)
    return items
