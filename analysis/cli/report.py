"""The ``report`` command: the exported report of one or more runs."""

from __future__ import annotations

import argparse
import sys

from analysis.store import Store


def cmd_report(args: argparse.Namespace) -> int:
    """report: build the runs' report and export it in the format of ``--out`` (or ``--format``)."""
    from analysis.report import ReportOptions, build_report, export, format_of

    fmt = format_of(args.out, args.format)  # a bad suffix fails before any work
    options = ReportOptions(loss_metric=args.loss, downstream_metric=args.downstream, x=args.x, full=args.full)
    report = build_report(Store(args.db), args.run, options)
    done = export(report, args.out, fmt)
    for item in report.missing:
        print(
            f"missing: {item.what}" + (f" (compute it with `{item.command}`)" if item.command else ""), file=sys.stderr
        )
    for note in done.notes:
        print(f"note: {note}", file=sys.stderr)
    size = done.path.stat().st_size / 1e6
    print(f"wrote {done.path} ({done.format}, {len(report.figures)} figures, {size:.1f} MB)")
    return 0
