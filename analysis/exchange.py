"""Move cached values between machines as Parquet: compute on a cluster, merge into a laptop's cache.

``export_parquet`` writes one Parquet file per table plus ``manifest.json`` (schema version,
row counts, date). ``import_parquet`` merges such a folder into a cache in one transaction:
primary keys decide duplicates, and a row whose key is already cached keeps the local
value. Results computed on weights other than the local checkpoint's (a different
fingerprint) are refused, and so is a folder whose files are missing, corrupt, or disagree
with the manifest: then nothing is written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from analysis.store import EXCHANGE_TABLES, SCHEMA_VERSION, Store, TableMerge

FORMAT = "cdd-cache-export"
MANIFEST = "manifest.json"
# Table -> primary key, in the order rows are merged (a checkpoint before its results).
TABLES: dict[str, tuple[str, ...]] = EXCHANGE_TABLES

__all__ = ["TABLES", "ImportReport", "TableMerge", "export_parquet", "import_parquet"]


@dataclass(frozen=True)
class ImportReport:
    tables: list[TableMerge]

    @property
    def added(self) -> int:
        return sum(t.added for t in self.tables)

    @property
    def skipped(self) -> int:
        return sum(t.skipped + t.kept_local for t in self.tables)

    def summary(self) -> str:
        parts = [f"{t.table} +{t.added} ({t.skipped} already cached, {t.kept_local} differing kept local)"
                 for t in self.tables]  # fmt: skip
        return f"imported {self.added} rows: " + "; ".join(parts)


def export_parquet(store: Store, folder: str | Path, runs: list[str] | None = None) -> dict:
    """Write the cache's tables (or only ``runs``) under ``folder``; returns the manifest."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    counts = store.export_tables(folder, runs)
    manifest = {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "source": str(store.path),
        "runs": sorted(runs) if runs else None,
        "rows": counts,
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: no manifest; point at a folder written by `python -m analysis export`") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: unreadable manifest ({str(err).splitlines()[0]}); export again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: not a cache export manifest (format {FORMAT!r} expected); export again")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(
            f"{path}: schema version {manifest.get('schema_version')!r}, this tool reads {SCHEMA_VERSION}; "
            "export again with the same version of the tool"
        )
    rows = manifest.get("rows")
    if not isinstance(rows, dict) or set(rows) != set(TABLES) or not all(isinstance(v, int) for v in rows.values()):
        raise ValueError(f"{path}: row counts missing or malformed; export again")
    for table in TABLES:
        if not (folder / f"{table}.parquet").is_file():
            raise ValueError(f"{folder / f'{table}.parquet'}: missing; export the whole folder again")
    return manifest


def import_parquet(store: Store, folder: str | Path) -> ImportReport:
    """Merge an export folder into the cache in one transaction; see the module docstring."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: no such folder; point at a folder written by `python -m analysis export`")
    manifest = _manifest(folder)
    files = {table: folder / f"{table}.parquet" for table in TABLES}
    return ImportReport(store.import_tables(files, manifest["rows"]))
