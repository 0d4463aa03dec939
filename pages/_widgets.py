"""Pickers the pages share: a metric per role, a setting per metric cached under several, and their defaults."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from pages._cache import _settings, db_path, generation, guarded
from pages._markdown import md_text


def metric_names(frame: pd.DataFrame) -> list[str]:
    """The metrics present in a long table, sorted."""
    return sorted(frame["metric"].unique()) if len(frame) else []


def setting_picker(runs: tuple[str, ...], metrics: list[str | None]) -> dict[str, str]:
    """A URL-bound selectbox per metric of ``metrics`` cached under several settings; returns metric -> label.

    Each defaults to the setting with the most checkpoints; a one-line caption says what is cached.
    """
    db = str(db_path())
    table = guarded(lambda: _settings(db, generation(), tuple(sorted(runs))))
    several = [(m, table[table["metric"] == m]) for m in dict.fromkeys(m for m in metrics if m)]
    several = [(m, rows) for m, rows in several if len(rows) > 1]
    if not several:
        return {}
    chosen: dict[str, str] = {}
    for column, (metric, rows) in zip(st.columns(len(several)), several, strict=True):
        counts = ", ".join(f"{s}: {n}" for s, n in zip(rows["setting"], rows["n_checkpoints"], strict=True))
        chosen[metric] = column.selectbox(
            f"Setting of {md_text(metric)}", list(rows["setting"]), index=0, key=f"setting_{metric}",
            bind="query-params", help=f"Checkpoints with a value, per setting: {md_text(counts)}",
        )  # fmt: skip
    cached = "; ".join(f"{md_text(m)} under {len(rows)}" for m, rows in several)
    st.caption(f"Several settings cached ({cached}): each curve shows one setting, never an average of several.")
    return chosen


def metric_picker(where, label: str, options: list[str], preferred: list[str], key: str) -> str:
    """A selectbox (in container ``where``) bound to the URL; defaults to the first preferred option present.

    The page checks first that there is something to pick (``optional_metric_picker`` where there may not be).
    """
    if not options:
        raise ValueError(f"{label}: no metric to pick from")
    default = next((m for m in preferred if m in options), options[0])
    return where.selectbox(label, options, index=options.index(default), key=key, bind="query-params")


def optional_metric_picker(where, label: str, options: list[str], preferred: list[str], key: str) -> str | None:
    """``metric_picker``, or None (and no widget) when there is nothing to pick."""
    return metric_picker(where, label, options, preferred, key) if options else None
