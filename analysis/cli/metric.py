"""The ``metric`` command: one metric on one checkpoint folder, printed, with nothing cached."""

from __future__ import annotations

import argparse
import json


def cmd_metric(args: argparse.Namespace) -> int:
    """metric: compute one metric on one checkpoint folder and print it; nothing is cached."""
    from analysis.jobs.metric_once import compute_once, progress_printer

    result = compute_once(
        args.name, args.checkpoint, args.data, params=args.param or [], device=args.device, seed=args.seed,
        progress=progress_printer(args.name), dtype=args.dtype,
    )  # fmt: skip
    if args.format == "json":
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")
    return 0
