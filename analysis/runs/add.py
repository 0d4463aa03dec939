"""Registering a run: the one code path behind ``add-run`` and the Runs page's "Add a run" form.

Everything a user types is checked before anything is written: a bad path, log, revision list or
filter raises ValueError with one line and leaves the cache as it was.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from analysis.runs.hub import HF_PREFIX
from analysis.runs.load import load_run, read_revisions
from analysis.store import RegisterReport, Store


@dataclass(frozen=True)
class AddResult:
    """A registered run: what the store changed, its steps, and one-line problems with what was skipped."""

    report: RegisterReport
    steps: tuple[int, ...]
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line: the run, its checkpoints and steps, what is new or changed, and the log values."""
        r = self.report
        span = f"steps {min(self.steps)}..{max(self.steps)}" if self.steps else "no checkpoints"
        return (
            f"registered run {r.run!r}: {r.checkpoints} checkpoints ({span}), "
            f"{r.new_checkpoints} new, {r.changed_checkpoints} changed, {r.log_rows} log values"
        )


def add_run(
    store: Store,
    path: str | Path,
    *,
    name: str | None = None,
    log: str | Path | None = None,
    revisions: str | None = None,
    revision_filter: str | None = None,
    step_map: str | Path | None = None,
    steps_per_checkpoint: int | None = None,
    trust_remote_code: bool = False,
    progress: Callable[[str], None] | None = None,
) -> AddResult:
    """Find a run's checkpoints and logs (``runs.load.load_run``) and register it in ``store``.

    ``path`` is a local run folder or ``hf://org/model``; ``revisions`` (hub only) a comma-separated list
    or a file of revision names, ``revision_filter`` (hub only) a glob or regex over them. ``progress``
    gets a short sentence at each stage (listing, reading, writing). Raises ValueError with one line on
    bad input, before anything is written.
    """
    say = progress or (lambda _: None)
    text = str(path).strip()
    if not text:
        raise ValueError("no path: give a run folder (checkpoint-N/ or step_N/ inside) or hf://org/model")
    if name is not None and not name.strip():
        name = None
    refs = read_revisions(revisions) if revisions is not None else None
    hub = text.startswith(HF_PREFIX)
    say("Listing the repository's revisions…" if hub and refs is None else "Finding checkpoints and logs…")
    run = load_run(
        text if hub else Path(text), name=name, log=log or None, refs=refs, step_map=step_map or None,
        steps_per_checkpoint=steps_per_checkpoint, revision_filter=revision_filter,
    )  # fmt: skip
    say(f"Writing {len(run.checkpoints)} checkpoints and {len(run.log)} log values to the cache…")
    report = store.register_run(run, trust_remote_code=trust_remote_code)
    return AddResult(report, tuple(c.step for c in run.checkpoints), list(run.problems))
