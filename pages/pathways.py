"""Pathways: mixture-of-experts routing (pathway distance and consistency, entropy, load) over training."""

from __future__ import annotations

from pages import _state

PATHWAYS = (
    "pathway_distance", "pathway_consistency", "routing_entropy", "expert_load",
    "pathway_distance_chars", "pathway_consistency_normalized",
)  # fmt: skip

_state.signal_view("Pathways", PATHWAYS, "routing metrics")
