"""Settings: the parameter sets a metric was computed under, and picking one per metric.

A series is (run, metric, setting). Results of one metric computed under different settings
(0-shot and 5-shot, two ``limit``s, a Hessian trace over every parameter and over ``subset=layer:0``)
are different series and are never averaged, so every analysis first keeps one setting per metric:
``select_settings``. The same setting is kept for every run, so runs are compared like with like.

A setting is a result's parameters without the keys that only say where a value came from (the file
an lm-eval result was imported from, the checkpoint named in its ``model_args``): the results of one
lm-eval configuration imported from one file per checkpoint are one series.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import PurePath
from typing import Any

import numpy as np
import pandas as pd

from analysis.store import params_hash

# Parameters that say where a value came from, not how it was computed.
PROVENANCE_KEYS = ("imported_from",)
# Inside lm-eval ``model_args`` ("pretrained=...,revision=step1000,dtype=float32"): the checkpoint itself, and
# how it was run rather than what was computed (Pythia's published sweep has use_accelerate=True on some
# steps only; it changes no score, so it must not split the sweep into two series).
CHECKPOINT_ARGS = (
    "pretrained", "revision", "use_accelerate", "parallelize", "device", "device_map", "batch_size",
    "max_batch_size", "low_cpu_mem_usage", "cache_dir", "offload_folder", "trust_remote_code",
)  # fmt: skip
# Keys named first in a label, in this order; the others follow alphabetically.
LABEL_ORDER = ("num_fewshot", "limit", "subset", "task", "data", "model_args.dtype", "dtype", "version")
_MISSING = object()


def setting_params(params: Mapping[str, Any] | str | None) -> dict[str, Any]:
    """The parameters that define a setting: ``params`` (a dict or its JSON text) without provenance keys.

    ``model_args`` of an imported lm-eval result is kept as its arguments other than the checkpoint
    (``pretrained``, ``revision``) and how it was run (``use_accelerate``, ``device``, ``batch_size``, ...:
    ``CHECKPOINT_ARGS``), e.g. ``{"dtype": "bfloat16"}``.
    """
    params = _as_dict(params)
    out = {k: v for k, v in params.items() if k not in PROVENANCE_KEYS}
    if "model_args" in out:
        args = _model_args(out.pop("model_args"))
        if args:
            out["model_args"] = args
    return out


def setting_labels(params_by_hash: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """Readable labels for the settings of ONE metric, naming only the keys whose values differ.

    ``{"h1": {"num_fewshot": 0, "limit": 200}, "h2": {"num_fewshot": 5, "limit": 200}}`` gives
    ``{"h1": "0-shot", "h2": "5-shot"}``; nested dicts (a metric's ``config``) count by their leaves
    (``subset=layer:0``). A single setting gets ``""``: there is nothing to tell apart. Labels are
    distinct: two settings that would read alike get their hash's first characters appended.
    """
    flat = {h: _flatten(setting_params(dict(p))) for h, p in params_by_hash.items()}
    if len(flat) <= 1:
        return {h: "" for h in flat}
    keys = sorted({k for f in flat.values() for k in f}, key=_key_order)
    differ = [k for k in keys if len({_canonical(f.get(k, _MISSING)) for f in flat.values()}) > 1]
    # A changed probe file changes its path and its digest together: the path says enough.
    for digest, path in (("data_digest", "data"), ("task_digest", "task")):
        if digest in differ and path in differ:
            differ.remove(digest)
    labels = {h: ", ".join(_describe(k, f.get(k, _MISSING)) for k in differ) for h, f in flat.items()}
    for h, label in labels.items():
        if not label or list(labels.values()).count(label) > 1:
            labels[h] = f"{label} #{h[:7]}" if label else f"setting {h[:7]}"
    return labels


def label_settings(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with every row kept and a ``setting`` column (the label of its metric's setting).

    ``params_hash`` becomes the setting's hash: the params hash of ``setting_params`` for results
    that carry provenance keys (imported lm-eval files), unchanged otherwise. Frames without a
    ``params_hash`` column are returned unchanged.
    """
    if "params_hash" not in frame.columns:
        return frame
    out = frame.copy()
    stored = out["params_hash"].fillna("").astype(str)
    texts = out["params"] if "params" in out.columns else pd.Series(None, index=out.index, dtype=object)
    to_setting: dict[str, str] = {}
    params_of: dict[str, dict[str, Any]] = {}
    for h, text in pd.DataFrame({"h": stored, "p": texts}).drop_duplicates("h").itertuples(index=False):
        full = _as_dict(text)
        params = setting_params(full)
        to_setting[h] = h if params == full else params_hash(params)
        params_of[to_setting[h]] = params
    out["params_hash"] = stored.map(to_setting)
    labels: dict[tuple[str, str], str] = {}
    for metric, group in out[["metric", "params_hash"]].drop_duplicates().groupby("metric", sort=False):
        named = setting_labels({h: params_of[h] for h in group["params_hash"]})
        labels |= {(metric, h): label for h, label in named.items()}
    out["setting"] = [labels[key] for key in zip(out["metric"], out["params_hash"], strict=True)]
    return out


def unconverged(frame: pd.DataFrame) -> pd.Series:
    """True for rows of an iterative estimate that did not converge (``converged`` False); False elsewhere,
    including frames without the column. Such a value is no value: analyses leave it out, charts mark it."""
    if "converged" not in frame.columns:
        return pd.Series(False, index=frame.index)
    return frame["converged"].eq(False).fillna(False).astype(bool)


def _version_key(version: Any) -> tuple[int, Any]:
    text = str(version)
    return (1, int(text)) if text.isdigit() else (0, text)


def drop_stale_versions(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows of ``frame`` without those a newer version of the same metric and setting replaced.

    A metric's ``version`` (in its parameters) changes when the numbers it produces change, so a value
    computed by an older version is not another setting to choose from: it is out of date. Of the rows
    that share a metric and every parameter but ``version``, only the newest version's are kept, for
    every run alike (a run not recomputed yet shows no value rather than an outdated one).
    """
    if "params" not in frame.columns or not len(frame):
        return frame
    full = [_as_dict(p) for p in frame["params"]]
    versions = [p.get("version") for p in full]
    if all(v is None for v in versions):
        return frame
    rest = [json.dumps({k: v for k, v in setting_params(p).items() if k != "version"}, sort_keys=True, default=str)
            for p in full]  # fmt: skip
    keys = list(zip(frame["metric"].astype(str), rest, strict=True))
    newest: dict[tuple[str, str], Any] = {}
    for key, version in zip(keys, versions, strict=True):
        if version is not None and (key not in newest or _version_key(version) > _version_key(newest[key])):
            newest[key] = version
    keep = [k not in newest or v == newest[k] for k, v in zip(keys, versions, strict=True)]
    return frame[np.asarray(keep, dtype=bool)]


def settings_table(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per (metric, setting): metric, params_hash, setting, n_checkpoints, runs, params.

    ``n_checkpoints`` counts distinct (run, step) with a finite value, ``runs`` the runs that have
    any, ``params`` is the setting's parameters (a dict). Sorted by metric, then the setting with
    the most checkpoints first (ties: more runs, then the label): the first row of a metric is the
    setting ``select_settings`` keeps by default. A frame without ``params_hash`` has one setting per metric.
    """
    frame = drop_stale_versions(frame)
    return _table(label_settings(frame if "params_hash" in frame.columns else frame.assign(params_hash="")))


def select_settings(frame: pd.DataFrame, chosen: Mapping[str, str] | None = None) -> pd.DataFrame:
    """Keep exactly one setting of every metric, the same for every run, with a ``setting`` column.

    ``chosen`` maps a metric to the setting to keep, by label (``"5-shot"``) or params hash; every
    other metric keeps the setting with the most checkpoints across the runs of ``frame`` (the
    first row of ``settings_table``). An unknown metric or setting in ``chosen`` raises a one-line
    ValueError naming the choices. Values are never averaged: the kept rows are stored ones, one per
    (run, step, metric); of two values of one setting at one checkpoint (one lm-eval configuration
    imported from two files) the one with the smaller stored hash. ``params_hash`` holds the
    setting's hash (see ``label_settings``). Frames without a ``params_hash`` column pass through.
    """
    if "params_hash" not in frame.columns:
        return frame
    frame = drop_stale_versions(frame)
    stored = frame["params_hash"].fillna("").astype(str).to_numpy()
    labelled = label_settings(frame)
    table = _table(labelled)
    keep = dict(table.drop_duplicates("metric")[["metric", "params_hash"]].itertuples(index=False))
    for metric, wanted in (chosen or {}).items():
        mine = table[table["metric"] == metric]
        if not len(mine):
            several = table.loc[table["metric"].duplicated(keep=False), "metric"].unique()
            raise ValueError(
                f"no metric {metric!r} in these results; metrics with several settings: "
                + (", ".join(sorted(several)) or "none")
            )
        by_stored = set(labelled.loc[(stored == wanted) & (labelled["metric"] == metric).to_numpy(), "params_hash"])
        by_stored.add(wanted)
        match = mine[(mine["setting"] == wanted) | mine["params_hash"].isin(by_stored)]
        if not len(match):
            choices = ", ".join(repr(s) for s in mine["setting"])
            raise ValueError(f"{metric}: no setting {wanted!r}; choose one of {choices} (or a params hash)")
        keep[metric] = match["params_hash"].iloc[0]
    kept = labelled[labelled["params_hash"].to_numpy() == labelled["metric"].map(keep).to_numpy()]
    order = pd.Series(stored, index=labelled.index).loc[kept.index].sort_values(kind="stable").index
    return kept.loc[order].drop_duplicates(["run", "step", "metric"]).sort_index().reset_index(drop=True)


def _table(labelled: pd.DataFrame) -> pd.DataFrame:
    columns = ["metric", "params_hash", "setting", "n_checkpoints", "runs", "params"]
    if not len(labelled):
        return pd.DataFrame(columns=columns)
    keys = ["metric", "params_hash"]
    values = pd.to_numeric(labelled["value"], errors="coerce").to_numpy(dtype=float)
    good = labelled[np.isfinite(values)]
    table = labelled.drop_duplicates(keys).set_index(keys)
    table["n_checkpoints"] = good.drop_duplicates([*keys, "run", "step"]).groupby(keys).size()
    table["runs"] = good.groupby(keys)["run"].nunique()
    table[["n_checkpoints", "runs"]] = table[["n_checkpoints", "runs"]].fillna(0).astype(int)
    texts = table["params"] if "params" in table.columns else pd.Series(None, index=table.index, dtype=object)
    table["params"] = [setting_params(t) for t in texts]
    table = table.reset_index()[columns]
    table = table.sort_values(
        ["metric", "n_checkpoints", "runs", "setting", "params_hash"], ascending=[True, False, False, True, True]
    )
    return table.reset_index(drop=True)


# -- labels -----------------------------------------------------------------------------------------


def _as_dict(params: Mapping[str, Any] | str | None) -> dict[str, Any]:
    if isinstance(params, Mapping):
        return dict(params)
    if isinstance(params, str) and params.strip():
        try:
            value = json.loads(params)
        except json.JSONDecodeError:
            return {"params": params}
        return dict(value) if isinstance(value, dict) else {"params": value}
    return {}


def _model_args(value: Any) -> dict[str, str]:
    """lm-eval ``model_args`` ("k=v,k=v" or a dict) without the arguments that name the checkpoint."""
    if isinstance(value, Mapping):
        pairs = {str(k): str(v) for k, v in value.items()}
    elif isinstance(value, str):
        pairs = dict(part.partition("=")[::2] for part in value.split(",") if part.strip())
        pairs = {k.strip(): v.strip() for k, v in pairs.items()}
    else:
        return {}
    return {k: v for k, v in sorted(pairs.items()) if k not in CHECKPOINT_ARGS}


def _flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out |= _flatten(value, f"{name}.")
        else:
            out[name] = value
    return out


def _short(key: str) -> str:
    """A nested key by its leaf (``config.subset`` -> ``subset``), except lm-eval's model arguments."""
    return key if key.startswith("model_args.") else key.rsplit(".", 1)[-1]


def _key_order(key: str) -> tuple[int, str]:
    for name in (key, _short(key)):
        if name in LABEL_ORDER:
            return LABEL_ORDER.index(name), key
    return len(LABEL_ORDER), key


def _canonical(value: Any) -> str:
    if value is _MISSING:
        return "\0missing"
    return json.dumps(value, sort_keys=True, default=str)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | tuple | dict):
        return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return str(value)


def _describe(key: str, value: Any) -> str:
    """One key's part of a label: friendly wording for the keys the project stores, ``key=value`` else."""
    name = _short(key)
    if value is _MISSING:
        return f"{name} unset"
    if name == "num_fewshot":
        return "default shots" if value is None else f"{value}-shot"
    if name == "limit":
        return "all documents" if value is None else f"limit {value}"
    if name in ("data_digest", "task_digest"):
        return f"{name.split('_')[0]} version {str(value)[:7]}"
    if name == "version":
        return f"v{value}"
    if name == "seed":
        return f"seed {value}"
    if name == "data" and isinstance(value, str):
        return f"data={PurePath(value).name or value}"
    if name == "task" and isinstance(value, str) and value.endswith((".yaml", ".yml")):
        return f"task={PurePath(value).name}"
    if value is None:
        return f"{name}=default"
    return f"{name}={_value(value)}"
