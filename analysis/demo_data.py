"""The demo's computed results, shipped beside the code so the dashboard is whole on first open.

``data/demo_results/`` holds what ``python -m analysis demo --rebuild`` computed on the two demo
runs (see :mod:`analysis.demo`): an export of the cache in the exchange format (one Parquet file
per table and ``manifest.json``, see :mod:`analysis.exchange`) and ``provenance.json``, which says
how it was made (code version, the run and evaluation settings and seeds, library versions,
machine, torch threads, build time).

- ``python -m analysis demo`` imports it into the cache: seconds, no training.
- ``python -m analysis demo --train`` builds the checkpoints too, to evaluate them yourself; the
  runs it retrains are evaluated again from their own weights.
- ``python -m analysis demo --rebuild`` (``make demo-rebuild``) retrains both runs from scratch,
  computes every demo evaluation, and rewrites the folder.

Checkpoint paths are stored relative to the demo root (``ROOT_TOKEN``) and pointed at the local
``data/demo`` on import, so the results line up with checkpoints trained later on the same seeds.
A test retrains the first checkpoints and checks the shipped values against recomputed ones.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

from analysis.store import Store

SHIPPED_DIR = Path(__file__).resolve().parent.parent / "data" / "demo_results"
PROVENANCE = "provenance.json"
ROOT_TOKEN = "<demo-root>"  # what the demo root's absolute path is replaced by in the shipped files


def code_version() -> str:
    """The git commit of the working tree (``+dirty`` when it has uncommitted changes), or "unknown"."""
    repo = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=repo, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo, capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def provenance(build_seconds: float, threads: int, *, finetune: bool = True) -> dict:
    """How the shipped results were made: enough to rebuild them and to know what might differ.

    ``finetune``: whether the fine-tune probe was computed (its settings, else None).
    """
    import importlib.metadata as md

    from analysis.demo import DEMO_EVAL, DEMO_FINETUNE, DEMO_RUNS, DEMO_VERSION, FINETUNE_CHECKPOINTS

    def version(name: str) -> str:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return "absent"

    return {
        "made_by": "python -m analysis demo --rebuild",
        "made_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "code_version": code_version(),
        "demo_version": DEMO_VERSION,
        "runs": {name: asdict(cfg) for name, cfg in DEMO_RUNS.items()},  # seeds included
        "evaluation": dict(DEMO_EVAL),
        "finetune": {**DEMO_FINETUNE, "checkpoints": FINETUNE_CHECKPOINTS} if finetune else None,
        "libraries": {n: version(n) for n in ("torch", "transformers", "lm-eval", "duckdb", "numpy", "scipy")},
        "python": platform.python_version(),
        "machine": {
            "system": platform.system(),
            "arch": platform.machine(),
            "cpus": os.cpu_count(),
            "processor": _cpu_model(),
        },
        "torch_threads_per_run": threads,
        "build_seconds": round(build_seconds),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def read_provenance(folder: Path = SHIPPED_DIR) -> dict:
    """The folder's provenance, or a one-line error saying how to make it."""
    path = Path(folder) / PROVENANCE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: missing; rebuild the shipped demo with `make demo-rebuild`") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: unreadable ({str(err).splitlines()[0]}); rebuild with `make demo-rebuild`") from None
    if not isinstance(data, dict) or not isinstance(data.get("runs"), dict):
        raise ValueError(f"{path}: not a demo provenance file (no 'runs'); rebuild with `make demo-rebuild`")
    return data


def export_demo(store: Store, folder: Path, root: Path, prov: dict) -> dict:
    """Write the demo runs of ``store`` (checkpoints under ``root``) to ``folder`` with ``prov``; the manifest.

    The paths in ``store`` are rewritten to ``ROOT_TOKEN`` first: ``store`` should be the build's own
    cache, not the user's.
    """
    from analysis.demo import DEMO_RUNS
    from analysis.exchange import export_parquet

    folder = Path(folder)
    names = list(DEMO_RUNS)
    store.relocate_runs(names, str(Path(root).resolve()), ROOT_TOKEN)
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    manifest = export_parquet(store, tmp, runs=names)
    manifest.pop("source", None)  # the build's temporary cache: means nothing elsewhere
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    (tmp / PROVENANCE).write_text(json.dumps(prov, indent=2) + "\n")
    _replace_folder(tmp, folder)
    return manifest


def _replace_folder(new: Path, old: Path) -> None:
    """Swap ``new`` in for ``old`` so a reader never sees half a folder."""
    import shutil

    if old.exists():
        trash = old.with_name(old.name + ".old")
        if trash.exists():
            shutil.rmtree(trash)
        os.replace(old, trash)
        os.replace(new, old)
        shutil.rmtree(trash)
    else:
        os.replace(new, old)


def missing_demo_runs(store: Store) -> list[str]:
    """The demo runs the cache does not hold yet."""
    from analysis.demo import DEMO_RUNS

    known = set(store.runs().get("name", []))
    return [name for name in DEMO_RUNS if name not in known]


def outdated_demo_runs(store: Store) -> list[str]:
    """The demo runs the cache holds from another version of the demo: checkpoint steps unlike today's config's."""
    from analysis.demo import DEMO_RUNS

    known = set(store.runs().get("name", []))
    return [
        name
        for name, cfg in DEMO_RUNS.items()
        if name in known and store.checkpoints(name)["step"].tolist() != cfg.checkpoint_steps()
    ]


def import_demo(store: Store, root: Path, folder: Path = SHIPPED_DIR):
    """Import the shipped demo results into ``store``, pointing checkpoint paths at ``root``; the ImportReport.

    Nothing is written when the folder is incomplete or damaged (see :func:`analysis.exchange.import_parquet`).
    """
    from analysis.demo import DEMO_RUNS
    from analysis.exchange import import_parquet

    read_provenance(folder)
    report = import_parquet(store, folder)
    store.relocate_runs(list(DEMO_RUNS), ROOT_TOKEN, str(Path(root).resolve()))
    return report


def rebuild(
    root: Path,
    folder: Path,
    *,
    scale: float = 1.0,
    progress: Callable[[int, int], None] | None = None,
    eval_progress: Callable[[int, int], None] | None = None,
    finetune: bool = True,
) -> float:
    """Retrain the demo runs from scratch under ``root``, compute every demo evaluation, write ``folder``.

    The results are computed in a cache of their own (a temporary file), never the user's, and
    ``folder`` is replaced only once everything has succeeded. Each run is evaluated in a child
    process of its own (side by side, as they train): first ``DEMO_EVAL``, then, with ``finetune``,
    the fine-tune probe on ``FINETUNE_CHECKPOINTS`` of its checkpoints. ``progress(done, total)``
    follows the training steps, ``eval_progress(done, total)`` the evaluated checkpoints over all
    jobs. Returns the build time in seconds. A failed evaluation stops the rebuild with its first
    error. ``scale`` < 1 trains shorter runs (see :meth:`DemoConfig.scaled`) to try the pipeline;
    only scale 1 is shipped.
    """
    import shutil
    import tempfile
    import time

    from analysis.demo import DEMO_RUNS, build_demo, demo_eval_spec, demo_finetune_spec
    from analysis.demo.processes import side_by_side
    from analysis.jobs import submit
    from analysis.runs.load import load_run

    start = time.monotonic()
    root = Path(root)
    for name in DEMO_RUNS:
        shutil.rmtree(root / name, ignore_errors=True)  # from scratch: a kept run would not test the code
    workers = min(len(DEMO_RUNS), os.cpu_count() or 1)
    folders = build_demo(root, scale=scale, progress=progress, workers=workers)
    threads = max(1, (os.cpu_count() or 1) // workers)
    with tempfile.TemporaryDirectory(prefix="demo-rebuild-") as tmp:
        db = Path(tmp) / "demo.duckdb"
        store = Store(db)
        jobs: dict[str, list[int]] = {}
        for run_dir in folders:
            store.register_run(load_run(run_dir))
            specs = [demo_eval_spec(run_dir.name)]
            if finetune:
                specs.append(demo_finetune_spec(run_dir.name, scale=scale))
            jobs[run_dir.name] = [submit(store, spec) for spec in specs]
        total = sum(len(store.job_units(job)) for ids in jobs.values() for job in ids)
        children = [(name, _evaluate_in_child, (str(db), ids, threads)) for name, ids in jobs.items()]
        report = None if eval_progress is None else (lambda done: eval_progress(done, total))
        side_by_side(children, workers, progress=report, what="demo evaluation of")
        if eval_progress is not None:
            eval_progress(total, total)
        seconds = time.monotonic() - start
        export_demo(store, Path(folder), root, {**provenance(seconds, threads, finetune=finetune), "scale": scale})
    return seconds


def _evaluate_in_child(db: str, jobs: list[int], threads: int, counter) -> None:
    """Child-process entry of :func:`rebuild`: run one demo run's jobs in turn, counting checkpoints in ``counter``.

    Both children write the same cache file; the store takes turns on it (analysis.store.connection).
    A failed unit ends the child with its first error in one line.
    """
    import sys

    import torch

    from analysis.jobs import run_job

    torch.set_num_threads(threads)
    store = Store(db, lock_timeout=600)
    done = 0
    for job in jobs:
        n_units = len(store.job_units(job))

        def unit_started(index: int, *_: object, base: int = done) -> None:
            counter.value = base + index

        report = run_job(store, job, progress=unit_started)
        if report.failed:
            print(f"demo rebuild: job {job}: {report.failed[0]}", file=sys.stderr)
            raise SystemExit(1)
        done += n_units
        counter.value = done


__all__ = [
    "SHIPPED_DIR",
    "export_demo",
    "import_demo",
    "missing_demo_runs",
    "outdated_demo_runs",
    "provenance",
    "read_provenance",
    "rebuild",
]
