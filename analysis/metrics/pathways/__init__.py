"""Expert-routing pathways of mixture-of-experts models: the routing metrics of the registry.

Definitions (DESIGN.md, "Grokking / pathways"):

- g_l: for one sample and MoE layer l, the router's softmax weights averaged over the
  sample's real tokens (attention_mask == 1), a vector over the E experts.
- Pathway: per layer, experts ranked by g_l (descending; ties by lower expert id), cut
  at the smallest prefix whose summed weight is >= the threshold (default 0.7; a 1e-9
  slack absorbs float rounding, so a threshold of 1.0 keeps every expert with weight).
- ``pathway_distance``: Levenshtein distance (unit costs) between token sequences
  "ids of layer 1, SEP, ids of layer 2, ...", SEP a token no expert id equals.
  ``pathway_distance_chars``: the same over the characters of strings like "3,1,5-2,7-4".
  A group's value is the mean over all unordered pairs of its samples.
- ``pathway_consistency``: per sample, the mean over consecutive MoE layers of
  cos(e_l, e_{l+1}), e_l = sum_k g_l(k) W_l[k], W_l the router weight (E, H) whose rows
  are read as expert embeddings; the group value is the mean over samples.
  ``pathway_consistency_normalized``: each cosine divided by the sample's largest cosine
  before averaging (see :func:`normalize_by_max` for a largest cosine <= 0).
- ``routing_entropy`` and ``expert_load``: controls (see their functions).

Routing is read once per checkpoint into a :class:`RoutingProfile`; the group functions
(``group_*``) then score any subset of samples (e.g. a memorisation group) without
running the model again.

One module per concept, all re-exported here:

- :mod:`.routing`: reading the router, :func:`routing_profile` and :class:`RoutingProfile`.
- :mod:`.extraction`: a sample's pathway from its averaged weights, and its written forms (one
  sample at a time, or every sample at once as a table and strings).
- :mod:`.edit_distance`: the NumPy Levenshtein kernel the rapidfuzz distances are checked against.
- :mod:`.distance`: pathway distance (mean pairwise Levenshtein distance, over distinct pathways
  weighted by how many samples share each).
- :mod:`.consistency`: pathway consistency (raw and max-normalised).
- :mod:`.entropy`: the controls, routing entropy and expert load balance.

:func:`memorised_from` and :func:`group_by_memorisation` live in :mod:`analysis.memorisation`
and are still importable from here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from analysis.metrics.common import MetricResult
from analysis.metrics.pathways.consistency import (
    consistency_cosines,
    group_pathway_consistency,
    normalize_by_max,
    pathway_consistency,
    pathway_consistency_normalized,
)
from analysis.metrics.pathways.distance import (
    PairwiseMean,
    PathwayDistanceConfig,
    distinct_pairwise_mean,
    group_pathway_distance,
    mean_pairwise_distance,
    pathway_distance,
    pathway_distance_chars,
    weighted_distance_sums,
)
from analysis.metrics.pathways.edit_distance import (
    levenshtein,
    levenshtein_batch,
    levenshtein_pairs,
    pad_sequences,
    sequence_codes,
)
from analysis.metrics.pathways.entropy import expert_load, group_expert_load, group_routing_entropy, routing_entropy
from analysis.metrics.pathways.extraction import (
    Pathway,
    pathway_string,
    pathway_table,
    pathway_texts,
    pathway_tokens,
    pathways_from_weights,
)
from analysis.metrics.pathways.routing import (
    RoutingConfig,
    RoutingProfile,
    capture_routing,
    router_weights,
    routing_profile,
    sample_indices,
)

_pad = pad_sequences  # the name bench.pathways pads the kernel's inputs with

# Each routing metric as a function of a RoutingProfile: a job reads the routing once per
# checkpoint and scores every routing metric from it (and each memorisation group too).
FROM_PROFILE: dict[str, Callable[..., MetricResult]] = {
    "pathway_distance": lambda profile, config, seed: group_pathway_distance(profile, None, config, seed=seed),
    "pathway_distance_chars": lambda profile, config, seed: group_pathway_distance(
        profile, None, config, seed=seed, chars=True
    ),
    "pathway_consistency": lambda profile, config, seed: group_pathway_consistency(profile, seed=seed),
    "pathway_consistency_normalized": lambda profile, config, seed: group_pathway_consistency(
        profile, normalized=True, seed=seed
    ),
    "routing_entropy": lambda profile, config, seed: group_routing_entropy(profile, seed=seed),
    "expert_load": lambda profile, config, seed: group_expert_load(profile, seed=seed),
}

# Memorisation is an analysis over checkpoints (analysis.memorisation, which needs pandas); these two
# names are served from there on first use, so importing the metrics does not import pandas.
_FROM_MEMORISATION = ("group_by_memorisation", "memorised_from")


def __getattr__(name: str) -> Any:
    if name in _FROM_MEMORISATION:
        from analysis import memorisation

        return getattr(memorisation, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "FROM_PROFILE",
    "PairwiseMean",
    "Pathway",
    "PathwayDistanceConfig",
    "RoutingConfig",
    "RoutingProfile",
    "capture_routing",
    "consistency_cosines",
    "distinct_pairwise_mean",
    "expert_load",
    "group_by_memorisation",
    "group_expert_load",
    "group_pathway_consistency",
    "group_pathway_distance",
    "group_routing_entropy",
    "levenshtein",
    "levenshtein_batch",
    "levenshtein_pairs",
    "mean_pairwise_distance",
    "memorised_from",
    "normalize_by_max",
    "pad_sequences",
    "pathway_consistency",
    "pathway_consistency_normalized",
    "pathway_distance",
    "pathway_distance_chars",
    "pathway_string",
    "pathway_table",
    "pathway_texts",
    "pathway_tokens",
    "pathways_from_weights",
    "router_weights",
    "routing_entropy",
    "routing_profile",
    "sample_indices",
    "sequence_codes",
    "weighted_distance_sums",
]
