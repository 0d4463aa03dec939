"""Geometry: flatness of the loss surface (Hessian trace, sharpness, ...) over training and against downstream."""

from __future__ import annotations

from pages import _state

FLATNESS = (
    "hessian_trace", "hessian_top_eigenvalue", "fisher_trace", "adaptive_sharpness",
    "perturbation_sensitivity", "sam_sharpness", "gradient_alignment",
)  # fmt: skip

_state.signal_view("Geometry", FLATNESS, "flatness metrics")
