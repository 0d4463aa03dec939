"""Internal signals of a checkpoint as pure functions: (model, batches, config) -> MetricResult.

- :mod:`.common`: the batch type, :class:`MetricResult`, "the loss", parameter subsets.
- :mod:`.flatness`: Hessian trace and top eigenvalue, Fisher trace, adaptive, perturbation
  and SAM sharpness (a package, one module per concept).
- :mod:`.pathways`: expert-routing pathways of mixture-of-experts models: routing profile,
  pathway distance and consistency, routing entropy and expert load (a package, one module
  per concept; memorisation groups are in :mod:`analysis.memorisation`).
- :mod:`.alignment`: cosines between data domains' loss gradients, with a same-domain ceiling.
- :mod:`.registry`: metrics by name, configs from key=value params, :func:`compute`.
"""

from __future__ import annotations

from analysis.metrics.alignment import (
    GradientAlignmentConfig,
    alignment_matrix,
    domain_gradients,
    gradient_alignment,
)
from analysis.metrics.common import Batch, MetricResult, lm_loss, select_params
from analysis.metrics.registry import MetricSpec, compute, get_metric, make_config, metric_names, register

__all__ = [
    "Batch",
    "GradientAlignmentConfig",
    "MetricResult",
    "MetricSpec",
    "alignment_matrix",
    "compute",
    "domain_gradients",
    "get_metric",
    "gradient_alignment",
    "lm_loss",
    "make_config",
    "metric_names",
    "register",
    "select_params",
]
