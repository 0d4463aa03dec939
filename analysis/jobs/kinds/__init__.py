"""Kinds of job work, registered by name: what a checkpoint unit can compute.

Both executors (analysis/jobs/runner.py in this process, analysis/jobs/ray_executor.py on Ray)
and the job planner (analysis/jobs/spec.py) go through this registry; none of them names a kind.

Built in: ``lm_eval`` (a task from ``--tasks``), ``heldout`` (``--metrics heldout_loss``),
``proxy``, ``samples`` (``memorisation``), ``finetune``, and ``metric`` (every name in
analysis/metrics/registry.py).

To add a kind, write one class in a module here and register it::

    @register
    class ParamNorm(WorkKind):
        name = "param_norm"  # what Item.kind holds
        requests = ("param_norm",)  # the --metrics name(s) that plan it

        def plan(self, spec, request):  # the items, with every parameter that shapes the result
            return [Item(self.name, request, {"version": "1"})]

        def produces(self, item, metric):  # which stored names are this item's (cache lookups)
            return metric == "param_norm"

        def compute(self, item, ctx, progress=None):  # rows from the loaded checkpoint in ctx
            norm = torch.sqrt(sum((p.float() ** 2).sum() for p in ctx.model.parameters()))
            return [ctx.row(item, "param_norm", float(norm), code_version="1")], []

then import the module below. Override ``group`` to give it its own Ray task, ``uses_probe``
when it reads the probe set, ``label`` and ``progress_unit`` for progress notes. A kind
registered outside this package (a script, a plugin) also runs on Ray: the driver ships the
kinds a unit uses to the worker, which adopts those it lacks (the kind's class must be
importable there, or defined in the driver's script, which Ray sends by value).
"""

from __future__ import annotations

# Importing the built-in kinds registers them.
from analysis.jobs.kinds import evaluations, finetune_probe, memorisation, registry_metrics  # noqa: F401
from analysis.jobs.kinds.base import (
    ItemProgress,
    UnitContext,
    WorkKind,
    adopt,
    get_kind,
    kind_for_request,
    kind_names,
    probe_batches,
    register,
    unregister,
)

__all__ = [
    "ItemProgress",
    "UnitContext",
    "WorkKind",
    "adopt",
    "get_kind",
    "kind_for_request",
    "kind_names",
    "probe_batches",
    "register",
    "unregister",
]
