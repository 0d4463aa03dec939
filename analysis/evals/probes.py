"""Probe sets for held-out loss and internal metrics, made from the bundled task data."""

from __future__ import annotations

import json
from pathlib import Path

from analysis.evals.tasks import DEFAULT_DATA_DIR


def write_modarith_probes(out_dir: str | Path, *, n: int = 256, data_dir: str | Path | None = None) -> Path:
    """Write ``train.jsonl`` and ``heldout.jsonl`` probe files ({"text": "a + b = c"}) from the task data.

    Two domains, so held-out loss separates what a run memorised from what it generalised.
    The first ``n`` records of each split are used: the same samples for every checkpoint.
    """
    data_dir = Path(data_dir) if data_dir is not None else DEFAULT_DATA_DIR
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for split in ("train", "heldout"):
        source = data_dir / "modarith" / f"{split}.jsonl"
        if not source.is_file():
            raise ValueError(f"{source}: missing; build the demo first with `python -m analysis demo`")
        lines = []
        for line in source.read_text().splitlines()[:n]:
            record = json.loads(line)
            lines.append(json.dumps({"text": f"{record['prompt']} {record['answer']}"}))
        target = out_dir / f"{split}.jsonl"
        tmp = target.with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        tmp.replace(target)  # never a half-written probe file
    return out_dir
