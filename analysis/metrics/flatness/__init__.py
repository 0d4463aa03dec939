"""Flatness of the loss around a checkpoint: curvature estimates and loss under weight noise.

Every function here has the same shape::

    metric(model, batches, config, *, device, seed, loss_fn=lm_loss, progress=None) -> MetricResult

and measures "the loss" of :mod:`analysis.metrics.common` (mean next-token cross-entropy
over the predicted tokens of all batches, token-weighted), in at least float32, with the
model in eval mode. ``loss_fn`` lets tests put a function with a known Hessian in place of
the language-model loss; it returns (mean loss, number of items averaged). ``progress(i, n)``,
when given, is called after each probe, iteration or noise draw (i = 1..n) so a caller can
show how far a long estimate is; the functions print nothing.

Per-token normalisation. The loss is a mean over tokens, so the Hessian of the loss is
the average of the per-token Hessians, and its trace is the per-token Hessian trace. With
several batches, the target is the Hessian of the token-weighted loss of their union,
H = sum_b (N_b / N) H_b, where N_b is the number of predicted tokens of batch b.

Standard errors. The probe batches are a sample of the data distribution, and the
population a stderr refers to is that distribution: the quantity of interest is the
curvature (or sensitivity) of the expected per-token loss, not of these particular
batches. Every probe-based metric draws its probes (Rademacher vectors, sampled labels,
weight-noise draws) for each batch separately and combines the values v[b, p] with
:func:`analysis.metrics.common.batch_clustered_mean`: the grand mean, and the standard
error of the B per-batch means (B - 1 degrees of freedom), which counts both the
batch-to-batch and the probe variation. Treating all B x P values as independent
understated it (3.4x on a 162M checkpoint; a ±2-stderr band covered the truth 48% of the
time). With a single batch the stderr covers the probe noise for that batch only, and the
result's ``stderr_covers`` says so. ``python -m bench.coverage`` checks the coverage of
the intervals (:func:`analysis.metrics.common.interval`) by simulation.

Second derivatives run inside ``sdpa_kernel(SDPBackend.MATH)``: torch has no double
backward for the fused CPU attention kernels, and the math kernel is faster here than
reloading with ``attn_implementation="eager"`` (which also works).

The metrics live in one module per concept, all re-exported here:

- :mod:`.hessian`: gradients, Hessian-vector products, Hutchinson's Hessian trace.
- :mod:`.eigen`: the top Hessian eigenvalue by power iteration or Lanczos.
- :mod:`.fisher`: the Fisher trace from labels sampled from the model.
- :mod:`.sharpness`: loss under weight noise (adaptive sharpness, perturbation
  sensitivity) and one-step SAM/ASAM sharpness.
"""

from __future__ import annotations

from analysis.metrics.flatness.eigen import (
    EigenEstimate,
    HessianEigenConfig,
    hessian_top_eigenvalue,
    lanczos,
    power_iteration,
)
from analysis.metrics.flatness.fisher import FisherTraceConfig, fisher_trace
from analysis.metrics.flatness.hessian import (
    HessianTraceConfig,
    Vector,
    gradient,
    hessian_trace,
    hessian_vector_product,
    hutchinson_probes,
    make_hvp_operator,
)
from analysis.metrics.flatness.sharpness import (
    AdaptiveSharpnessConfig,
    PerturbationConfig,
    SamConfig,
    adaptive_sharpness,
    perturbation_sensitivity,
    sam_sharpness,
)

__all__ = [
    "AdaptiveSharpnessConfig",
    "EigenEstimate",
    "FisherTraceConfig",
    "HessianEigenConfig",
    "HessianTraceConfig",
    "PerturbationConfig",
    "SamConfig",
    "Vector",
    "adaptive_sharpness",
    "fisher_trace",
    "gradient",
    "hessian_top_eigenvalue",
    "hessian_trace",
    "hessian_vector_product",
    "hutchinson_probes",
    "lanczos",
    "make_hvp_operator",
    "perturbation_sensitivity",
    "power_iteration",
    "sam_sharpness",
]
