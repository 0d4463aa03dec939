"""Logging for the worker, the job runner and the executors: levels, the worker's log file, its tail.

Modules log through ``logging.getLogger(__name__)`` and configure nothing; the command line
configures once (:func:`configured`): records of the ``analysis`` loggers at ``--log-level``
and above go to stderr and, for a worker, to ``<db dir>/logs/<db name>-worker-<pid>.log`` (size-capped,
rotated). The Jobs page reads a job's lines back from that file (:func:`job_log_tail`).
"""

from __future__ import annotations

import logging
import logging.handlers
import sys
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

LEVELS = ("debug", "info", "warning", "error")
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# One worker's log stays under ~3 MB: 1 MB a file, two rotated copies.
MAX_BYTES = 1_000_000
BACKUPS = 2
TAIL_LINES = 50


class _Stderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record arrives, not when the handler was made
    (tests and callers redirect stderr around each command)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def parse_level(name: str) -> int:
    """The logging level for a ``--log-level`` value (case-insensitive); ValueError naming the choices."""
    if not isinstance(name, str) or name.lower() not in LEVELS:
        raise ValueError(f"--log-level {name!r}: use one of {', '.join(LEVELS)}")
    return logging.getLevelNamesMapping()[name.upper()]


def worker_log_path(db: str | Path, pid: int) -> Path:
    """Where worker ``pid`` serving the cache ``db`` writes its log: ``<db dir>/logs/<db name>-worker-<pid>.log``.

    The cache's name is in the file name because two caches can share a folder (and so job ids).
    """
    db = Path(db).resolve()
    return db.parent / "logs" / f"{db.stem}-worker-{int(pid)}.log"


def worker_logs(db: str | Path) -> list[Path]:
    """Every log file (rotated copies included) of the workers that served ``db``, oldest first."""
    db = Path(db).resolve()
    folder = db.parent / "logs"
    if not folder.is_dir():
        return []
    files = [p for p in folder.glob(f"{db.stem}-worker-*.log*") if p.is_file()]
    # A rotated copy (.1, .2) was last written before the file that replaced it: mtime orders them.
    return sorted(files, key=lambda p: p.stat().st_mtime)


@contextmanager
def configured(level: str = "info", log_file: Path | None = None) -> Iterator[logging.Logger]:
    """Route the ``analysis`` loggers to stderr (and ``log_file``) at ``level`` for the duration; yields the logger.

    The handlers are removed and the file closed on exit, so calling it once per command, even
    many times in one process, never stacks handlers or leaves files open.
    """
    numeric = parse_level(level)
    root = logging.getLogger("analysis")
    handlers: list[logging.Handler] = [_Stderr()]
    if log_file is not None:
        try:
            log_file.parent.mkdir(parents=True, exist_ok=True)
            handlers.append(
                logging.handlers.RotatingFileHandler(
                    log_file, maxBytes=MAX_BYTES, backupCount=BACKUPS, encoding="utf-8"
                )
            )
        except OSError as err:
            raise ValueError(
                f"{log_file}: cannot write the worker log ({err.strerror}); "
                "make its folder writable or pass another --db"
            ) from None
    formatter = logging.Formatter(FORMAT, datefmt="%Y-%m-%d %H:%M:%S")
    for handler in handlers:
        handler.setFormatter(formatter)
        handler.setLevel(numeric)
        root.addHandler(handler)
    before = root.level
    root.setLevel(numeric)
    try:
        yield root
    finally:
        root.setLevel(before)
        for handler in handlers:
            root.removeHandler(handler)
            handler.close()


def tail(path: str | Path, n: int = TAIL_LINES, *, keep: Callable[[str], bool] | None = None) -> list[str]:
    """The last ``n`` lines of a text file (of those ``keep`` accepts, when given); [] when it is absent.

    Reads the whole file once: a worker log is size-capped (``MAX_BYTES``), so that stays cheap.
    """
    out: deque[str] = deque(maxlen=n)
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if keep is None or keep(line):
                    out.append(line.rstrip("\n"))
    except FileNotFoundError:
        return []
    return list(out)


def job_log_tail(db: str | Path, job_id: int, n: int = TAIL_LINES) -> list[str]:
    """The last ``n`` lines the workers serving ``db`` logged about job ``job_id``, in time order; [] if none.

    Lines about a job carry ``job <id>:`` or ``job <id> step``. Every worker's file counts: a job
    that a second worker resumed after the first died shows both. A job run by ``eval`` (no worker)
    has no lines, and the page falls back to the messages stored with its units.
    """
    lines: list[str] = []
    for path in worker_logs(db):
        lines += tail(path, n, keep=lambda line: _about(line, job_id))
    # Each line starts with its time (FORMAT): a stable sort interleaves two workers' files.
    lines.sort(key=lambda line: line[:19])
    return lines[-n:]


def _about(line: str, job_id: int) -> bool:
    return f"job {job_id}:" in line or f"job {job_id} step" in line


def job_log(db: str | Path, job_id: int, units, message: str = "") -> tuple[str, list[str]]:
    """What the Jobs page shows as a job's log: (where the lines come from, the last ``TAIL_LINES`` lines).

    The workers' log files when one ran the job here; else the messages stored in the cache (the
    job's summary and each unit's last note or error), so a job run by ``eval`` or on another
    machine still shows why a checkpoint failed. ``units`` is ``Store.job_units``' frame.
    """
    lines = job_log_tail(db, job_id)
    if lines:
        db = Path(db).resolve()
        return f"{db.parent / 'logs' / db.stem}-worker-*.log", lines
    stored = [
        f"step {u.unit} [{u.status}]: {u.message}" for u in units.itertuples() if getattr(u, "message", "")
    ]  # fmt: skip
    if message:
        stored.append(f"job {job_id}: {message}")
    return "messages stored in the cache", stored[-TAIL_LINES:]
