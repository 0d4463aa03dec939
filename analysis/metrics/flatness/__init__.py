"""Flatness of the loss around a checkpoint: curvature estimates and loss under weight noise."""

from __future__ import annotations

from analysis.metrics.flatness.hessian import (
    AdaptiveSharpnessConfig,
    EigenEstimate,
    FisherTraceConfig,
    HessianEigenConfig,
    HessianTraceConfig,
    PerturbationConfig,
    SamConfig,
    Vector,
    adaptive_sharpness,
    fisher_trace,
    hessian_top_eigenvalue,
    hessian_trace,
    hutchinson_probes,
    lanczos,
    make_hvp_operator,
    perturbation_sensitivity,
    power_iteration,
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
    "hessian_top_eigenvalue",
    "hessian_trace",
    "hutchinson_probes",
    "lanczos",
    "make_hvp_operator",
    "perturbation_sensitivity",
    "power_iteration",
    "sam_sharpness",
]
