"""Content digests of lm-eval tasks: the part of an lm-eval item's cache key that says "same task".

A task YAML's digest covers exactly what lm-eval reads for it, and nothing else:

- the YAML's own bytes, and the bytes of every YAML it pulls in through ``include:`` (resolved
  relative to the including file, recursively; a cycle is followed once, not forever);
- the bytes of every data file its effective ``dataset_kwargs.data_files`` names (a string, a
  list, or a dict of split -> path or list; glob patterns expand as ``datasets`` expands them).
  Relative paths resolve as ``datasets`` resolves them for ``dataset_path: json``: against
  ``dataset_kwargs.data_dir`` if given, else against the working directory -- not the YAML's
  folder (see NOTES.md);
- the Python files beside the YAML that its ``!function`` tags name (``utils.process_docs``).

Neither the folder the YAML sits in nor the paths themselves are hashed: a log or cache file
written beside the YAML leaves the digest alone, and an edited data file changes it.

A built-in task (a name, not a path) is digested by its name and the installed lm-eval
version; its own version would need lm-eval's full task index (~6 s), so it is left out.
"""

from __future__ import annotations

import glob
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

_GLOB_CHARS = ("*", "?", "[")


@dataclass
class _Walk:
    """What one digest has read so far: parsed YAMLs (in first-visit order) and their functions."""

    configs: dict[Path, dict[str, Any]] = field(default_factory=dict)
    functions: dict[Path, list[str]] = field(default_factory=dict)


def builtin_task_digest(name: str) -> str:
    """Digest of a built-in lm-eval task: its name and the installed lm-eval version."""
    from importlib.metadata import version

    return _short(json.dumps({"builtin": name, "lm_eval": version("lm_eval")}).encode())


def yaml_task_digest(path: str | Path) -> str:
    """Digest of a task YAML by content: itself, its includes, its data files, its ``!function`` modules.

    Raises a one-line ValueError naming the YAML when it, an include or a data file is missing.
    """
    top = Path(path).expanduser().resolve()
    walk = _Walk()
    config = _effective_config(top, walk, stack=())
    digest = hashlib.sha256()
    for file in walk.configs:
        digest.update(b"yaml\0" + _file_sha(file).encode())
        for module in _function_modules(file, walk.functions[file]):
            digest.update(b"function\0" + _file_sha(module).encode())
    for split, file in _data_files(top, config):
        digest.update(f"data\0{split}\0{file.name}\0".encode() + _file_sha(file).encode())
    return digest.hexdigest()[:16]


def yaml_task_names(path: str | Path) -> tuple[str, ...]:
    """The task names a task YAML's results are stored under (its ``task:``, or a group's tasks).

    lm-eval reports results by task name, not by YAML path, so the cache looks for these.
    Empty when the YAML names no task by a plain string (its results are then never found cached).
    """
    config = _effective_config(Path(path).expanduser().resolve(), _Walk(), stack=())
    task = config.get("task")
    entries = task if isinstance(task, list) else [task]
    names = [e.get("task") if isinstance(e, dict) else e for e in entries]
    return tuple(n for n in names if isinstance(n, str))


def _effective_config(path: Path, walk: _Walk, stack: tuple[Path, ...]) -> dict[str, Any]:
    """The YAML merged with its includes as lm-eval merges them: included keys first, local keys win."""
    if path not in walk.configs:
        walk.configs[path], walk.functions[path] = _read_yaml(path)
    config = dict(walk.configs[path])
    includes = config.pop("include", None)
    if includes is None or path in stack:  # a cycle: this file's includes are already being merged
        return config
    merged: dict[str, Any] = {}
    for include in includes if isinstance(includes, list) else [includes]:
        target = Path(str(include)).expanduser()
        target = (target if target.is_absolute() else path.parent / target).resolve()
        if not target.is_file():
            raise ValueError(f"{path}: included task YAML {target} not found; fix the include: key or add the file")
        included = _effective_config(target, walk, (*stack, path))
        included.pop("task_list", None)  # lm-eval does not inherit task_list either
        merged.update(included)
    merged.update(config)
    return merged


def _read_yaml(path: Path) -> tuple[dict[str, Any], list[str]]:
    """Parse one task YAML without importing anything; return it and the ``!function`` names it uses."""
    if not path.is_file():
        raise ValueError(f"{path}: task YAML not found; pass an lm-eval task name or the path of an existing task YAML")
    functions: list[str] = []

    class Loader(yaml.SafeLoader):
        pass

    def function(loader: yaml.SafeLoader, node: yaml.Node) -> str:
        functions.append(str(loader.construct_scalar(node)))  # type: ignore[arg-type]
        return functions[-1]

    Loader.add_constructor("!function", function)
    try:
        config = yaml.load(path.read_text(encoding="utf-8"), Loader=Loader)  # a SafeLoader subclass
    except (yaml.YAMLError, UnicodeDecodeError):
        raise ValueError(f"{path}: not a readable YAML file; fix the syntax of the task file") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: a task YAML must be a mapping of keys; fix the task file")
    return config, functions


def _function_modules(path: Path, functions: list[str]) -> list[Path]:
    """The local Python files ``!function module.name`` tags load (lm-eval looks beside the YAML first)."""
    modules = []
    for qualified in functions:
        module = qualified.rpartition(".")[0]
        candidate = (path.parent / f"{module.replace('.', '/')}.py").resolve()
        if module and candidate.is_file() and candidate not in modules:
            modules.append(candidate)
    return modules


def _data_files(top: Path, config: dict[str, Any]) -> list[tuple[str, Path]]:
    """(split, file) for every local data file the effective config names, in a stable order."""
    kwargs = config.get("dataset_kwargs") or {}
    if not isinstance(kwargs, dict):
        return []
    named = kwargs.get("data_files")
    if named is None:
        return []
    if isinstance(named, dict):
        entries = [(str(split), item) for split in sorted(named, key=str) for item in _as_list(named[split])]
    else:
        entries = [("", item) for item in _as_list(named)]
    base = Path(str(kwargs.get("data_dir") or "")).expanduser().resolve()  # "" -> the working directory
    out: list[tuple[str, Path]] = []
    for split, item in entries:
        out.extend((split, file) for file in _local_files(top, base, str(item)))
    return out


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _local_files(top: Path, base: Path, name: str) -> list[Path]:
    """The files one ``data_files`` entry means; remote URLs name nothing local."""
    if "://" in name:
        return []
    path = Path(name).expanduser()
    path = path if path.is_absolute() else base / path
    if path.is_file():
        return [path]
    if any(char in name for char in _GLOB_CHARS):
        matches = sorted(Path(m) for m in glob.glob(str(path), recursive=True) if Path(m).is_file())
        if matches:
            return matches
    where = "" if Path(name).expanduser().is_absolute() else f" (relative data_files resolve against {base})"
    raise ValueError(f"{top}: data file {path} not found{where}; fix data_files or write an absolute path")


def _file_sha(path: Path) -> str:
    """sha256 of a file, read every time: an edit within the clock's granularity must still count."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _short(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]
