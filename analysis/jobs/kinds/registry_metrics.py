"""The internal metrics of analysis/metrics/registry.py (flatness, alignment, pathways) as job work.

Every registered metric name is a request of this kind; it stores one row under its own name. The
routing metrics read one shared routing profile per checkpoint (``UnitContext.routing``), so Ray
keeps them in one task; every other metric is a task of its own.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict

from analysis.jobs.kinds.base import ItemProgress, Output, UnitContext, WorkKind, register
from analysis.jobs.spec import Item, JobSpec, probe_params, probe_path


@register
class RegistryMetricKind(WorkKind):
    """One registry metric on the unit's fixed probe batches."""

    name = "metric"
    uses_probe = True

    def request_names(self) -> Iterable[str]:
        from analysis.metrics.registry import metric_names

        return metric_names()

    def plan(self, spec: JobSpec, request: str) -> list[Item]:
        from analysis.metrics.registry import get_metric, metric_settings

        metric = get_metric(request)  # KeyError with "did you mean" for a typo
        # --param METRIC.seed=N seeds this metric's draws instead of the job's --seed.
        config, own_seed = metric_settings(request, spec.metric_params.get(request, {}))
        params = {
            **probe_params(spec),
            "batches": spec.metric_batches,
            "probe_batching": "per_domain",
            "batch_size": spec.batch_size,
            "seed": spec.seed if own_seed is None else own_seed,
            "version": metric.version,
            "config": asdict(config),
        }
        return [Item(self.name, request, params, data=probe_path(spec))]

    def produces(self, item: Item, metric: str) -> bool:
        return metric == item.name

    def group(self, item: Item) -> str:
        return "routing" if self._from_profile(item) else item.name

    def label(self, item: Item) -> str:
        return item.name

    def progress_unit(self, item: Item) -> str:
        from analysis.metrics.registry import progress_unit

        return progress_unit(item.name)

    def compute(self, item: Item, ctx: UnitContext, progress: ItemProgress | None = None) -> Output:
        from analysis.metrics.registry import compute, compute_from_profile

        config = item.params["config"]
        # The metric's own seed (--param METRIC.seed=N) is in its params; older jobs used the job's.
        seed = item.params.get("seed", ctx.spec.seed)
        if self._from_profile(item):
            res = compute_from_profile(item.name, ctx.routing, config, seed=seed)
        else:
            res = compute(item.name, ctx.model, ctx.batches, config, device=ctx.device, seed=seed, progress=progress)
        # converged is None unless the metric is iterative (an eigenvalue); the store keeps it.
        row = ctx.row(item, item.name, res.value, res.stderr, res.n, item.params["version"], converged=res.converged)
        return [row], []

    @staticmethod
    def _from_profile(item: Item) -> bool:
        from analysis.metrics.registry import get_metric

        return get_metric(item.name).from_profile is not None
