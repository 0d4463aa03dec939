"""The dtype each item of a job computes in on one checkpoint, and the dtype its unit loads the checkpoint in.

The dtype is part of an item's cache key (``params["dtype"]``): a held-out loss computed in bfloat16
and one computed in float32 are two settings, never one series. It is resolved per checkpoint, before
anything loads, by :func:`analysis.models.compute_dtype_for` from the device, the dtype the weights are
stored in (read from their header) and what the item does with the model; the unit then loads the
checkpoint in the dtype its items were keyed with, so the key says what was computed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path

import torch

from analysis.jobs.spec import Item, JobSpec
from analysis.models import FORWARD, GRADIENT, compute_dtype_for, dtype_name, parse_dtype, pick_device, stored_dtype

# Registry families whose metrics take gradients or second derivatives: computed in float32 or wider.
GRADIENT_FAMILIES = ("flatness", "alignment")


def metric_purpose(name: str) -> str:
    """``"gradient"`` for a registry metric of a gradient family (flatness, alignment), else ``"forward"``.

    Names that are not registry metrics (``heldout_loss``, lm-eval tasks) are forward passes.
    """
    from analysis.metrics.registry import get_metric

    try:
        family = get_metric(name).family
    except KeyError:
        return FORWARD
    return GRADIENT if family in GRADIENT_FAMILIES else FORWARD


def item_purpose(item: Item) -> str:
    """What ``item`` does with the model: :func:`metric_purpose` for registry metrics, else ``"forward"``."""
    return metric_purpose(item.name) if item.kind == "metric" else FORWARD


def with_dtypes(
    items: Iterable[Item],
    spec: JobSpec,
    checkpoint: str | Path,
    *,
    device: str | torch.device | None = None,
    cpu_dtypes: frozenset[torch.dtype] | None = None,
) -> list[Item]:
    """``items`` with ``params["dtype"]``: the dtype each computes in on ``checkpoint``.

    ``device`` defaults to the spec's (``"auto"`` resolved in this process); ``cpu_dtypes`` to this
    CPU's natively supported low-precision dtypes. Reads the weights' header, not the weights.
    """
    stored = stored_dtype(checkpoint)
    where = pick_device(spec.device if device is None else device)
    out = []
    for item in items:
        dtype = compute_dtype_for(where, stored, item_purpose(item), requested=spec.dtype, cpu_dtypes=cpu_dtypes)
        out.append(replace(item, params={**item.params, "dtype": dtype_name(dtype)}))
    return out


def load_dtype(items: Sequence[Item], spec: JobSpec) -> torch.dtype | None:
    """The dtype a unit loads its checkpoint in, from the dtypes its ``items`` were keyed with.

    That of its forward items, which run on the loaded model as it is; a unit of gradient items only
    loads in theirs (float32), which spares the float32 copy they would otherwise make of a bf16 model.
    Items planned without a dtype fall back to the spec's (None: the checkpoint's own).
    """
    forward = [it.params.get("dtype") for it in items if item_purpose(it) == FORWARD]
    names = [name for name in forward or [it.params.get("dtype") for it in items] if name]
    return parse_dtype(names[0] if names else spec.dtype)
