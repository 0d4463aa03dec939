"""The sections about the cache itself: the runs and analysis settings, every cached result, and provenance."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pandas as pd

from analysis import divergence as dv
from analysis.report.context import MAX_ROWS, ReportContext, eval_command, where_data
from analysis.report.formatting import fmt_number
from analysis.report.model import Missing, ReportTable, Section


def runs_section(ctx: ReportContext, info: pd.DataFrame) -> Section:
    """The runs (``info``: the store's runs table, one row per run), the analysis settings, and metric settings."""
    s = Section("runs", "Runs and settings")
    o = ctx.options
    s.text.append(
        f"{len(ctx.runs)} run(s) from the cache {ctx.store.path}. Every figure and number below is computed from "
        "that cache by the same code the dashboard's pages use; the last section gives the provenance of each one."
    )
    table = pd.DataFrame(
        {
            "run": info["name"],
            "source": info["source"],
            "checkpoints": info["checkpoints"],
            "first step": info["first_step"],
            "last step": info["last_step"],
            "logged metrics": info["log_metrics"],
            "cached results": info["results"],
            "remote code": info["trust_remote_code"],
            "config": info["config"],
        }
    )
    ctx.put(s, "runs", "Runs", table)
    settings = pd.DataFrame(
        [
            ("loss metric", ctx.named(o.loss_metric) or "(none cached)"),
            ("downstream metric", ctx.named(o.downstream_metric) or "(none cached)"),
            ("x-axis", o.x),
            ("flat loss within", dv.flat_words(o.loss_tol, o.tol_of)),
            ("window false-alarm rate per run (alpha)", fmt_number(o.alpha)),
            ("matched-loss levels", str(o.levels)),
        ],
        columns=["setting", "value"],
    )
    s.tables.append(ReportTable("settings", "Analysis settings", settings))
    several = ctx.several()
    if len(several):
        ctx.put(
            s,
            "metric_settings",
            "Metrics cached under several settings",
            several,
            "A series is one metric under one setting; the report shows one setting of each metric (the one "
            "with most checkpoints unless another was picked) and never averages settings.",
            printed=several.assign(shown=several["shown"].map({True: "shown", False: ""})),
        )
    for row in info.itertuples(index=False):
        if not row.checkpoints:
            s.missing.append(
                Missing(f"run {row.name!r} has no checkpoints registered", "python -m analysis add-run PATH")
            )
    return s


def results_section(ctx: ReportContext) -> Section:
    """Every computed value of each run, a table per run (step by metric), within the page budget."""
    s = Section("results", "Cached results")
    s.text.append(
        "Every computed value of each run, per checkpoint, each metric under one setting (named in Runs and "
        "settings where several are cached; values of different settings are never averaged). The data export "
        "(CSV or Parquet) has every setting's values."
    )
    results = ctx.frame[ctx.frame["source"] == "result"] if "source" in ctx.frame else ctx.frame.iloc[:0]
    for run in ctx.runs:
        mine = results[results["run"] == run]
        if not len(mine):
            s.missing.append(
                Missing(
                    f"run {run!r} has no computed results",
                    eval_command(ctx.store, run, tasks="modarith_em,modarith_mc", metrics="heldout_loss"),
                )
            )
            continue
        table = mine.pivot_table(index="step", columns="metric", values="value", aggfunc="first").reset_index()
        table.columns.name = None
        narrow = table.shape[1] <= 12  # printed whole or not at all
        ctx.put(s, f"results-{run}", f"{run}", table, limit=MAX_ROWS if narrow else 0, whole=True)
    if s.elsewhere:
        s.text[0] = (
            f"{len(results)} computed values of {results['metric'].nunique()} metrics: too many to print within the "
            "page budget. " + where_data(ctx)
        )
    return s


def provenance_section(
    ctx: ReportContext,
    data: pd.DataFrame,
    checkpoints: pd.DataFrame,
    sources: dict[str, str],
    versions: dict[str, str],
    now: datetime | None,
) -> Section:
    """Where each number comes from: computed values, logged values, the checkpoints, and this report itself."""
    s = Section("provenance", "Provenance")
    s.text.append(
        "Where each number comes from. Computed values: the checkpoints they were computed on (their content "
        "fingerprints are listed below), the metric or task version, the parameters and their hash, the library "
        "versions and the time of computation. Logged values: the run's training log. The data export has this "
        "for every single value."
    )
    results = data[data["source"] == "result"]
    if len(results):
        rows = _computed_rows(results)
        printed = rows
        if not ctx.options.full and len(rows) > MAX_ROWS:
            # One row per run, version and libraries (metrics counted) instead of one per metric.
            keys = ["run", "version", "libraries"]
            printed = rows.groupby(keys, as_index=False, sort=True).agg(
                metrics=("metric", "size"),
                params_hashes=("params hash", "nunique"),
                computed_at=("computed at", lambda c: f"{min(c)[:19]} to {max(c)[-19:]}"),
            )
        ctx.put(s, "provenance_results", "Computed values", rows, printed=printed)
        params = results.drop_duplicates("params_hash")[["params_hash", "params"]]
        params = params.rename(columns={"params_hash": "params hash"}).sort_values("params hash")
        caption = "The parameters behind each params hash."
        # Parameter sets are long JSON: printed when a few, else only exported.
        ctx.put(s, "parameters", "Parameter sets", params, caption, limit=MAX_ROWS // 2, whole=True)
    logs = data[data["source"] == "log"]
    if len(logs):
        table = logs.groupby(["run", "metric"], as_index=False).agg(steps=("step", _span))
        table["from"] = table["run"].map(lambda r: f"training log of {sources.get(r, '?')}")
        ctx.put(s, "provenance_logs", "Logged values", table.rename(columns={"steps": "steps (count)"}))
    if len(checkpoints):
        table = checkpoints[["run", "step", "tokens", "fingerprint", "path"]]
        ctx.put(s, "checkpoints", "Checkpoints", table, whole=True)
    generated = (now or datetime.now(UTC)).astimezone(UTC)
    about = [("generated", generated.strftime("%Y-%m-%d %H:%M:%S UTC")), ("cache file", str(ctx.store.path))]
    about += [(name, version) for name, version in versions.items()]
    s.tables.append(ReportTable("about", "This report", pd.DataFrame(about, columns=["item", "value"])))
    return s


def _computed_rows(results: pd.DataFrame) -> pd.DataFrame:
    """One row per (run, metric, params hash, version, libraries) of the computed values, with its provenance."""
    rows = []
    keys = ["run", "metric", "params_hash", "code_version", "lib_versions"]
    for (run, metric, phash, code, libs), group in results.groupby(keys, sort=True, dropna=False):
        fps = group["fingerprint"].dropna().unique()
        try:
            lib_text = ", ".join(f"{k} {v}" for k, v in sorted(json.loads(libs).items()))
        except (TypeError, ValueError):
            lib_text = str(libs)
        when = pd.to_datetime(group["computed_at"], errors="coerce")
        first, last = fmt_number(when.min()), fmt_number(when.max())
        rows.append(
            {
                "run": run,
                "metric": metric,
                "steps (count)": _span(group["step"]),
                "checkpoints": fps[0] if len(fps) == 1 else f"{len(fps)} (listed below)",
                "version": code,
                "params hash": phash,
                "libraries": lib_text,
                "computed at": first if first == last else f"{first} to {last}",
            }
        )
    return pd.DataFrame(rows)


def _span(steps: pd.Series) -> str:
    """``first–last (count)`` of a series of steps, ``–`` when it has none."""
    steps = pd.to_numeric(steps, errors="coerce").dropna()
    if not len(steps):
        return "–"
    lo, hi = int(steps.min()), int(steps.max())
    return f"{lo}–{hi} ({steps.nunique()})" if lo != hi else f"{lo} (1)"
