"""Which way is better for a metric: every analysis orients by this before it calls a move good or bad.

The direction of a metric comes from, in this order:

1. what its producer declared: lm-eval result files carry ``higher_is_better`` per metric, and the store
   keeps it beside each value (the ``higher_is_better`` column of ``Store.long_table``);
2. the metric registry (``analysis.metrics.registry``: flatness, pathway and proxy metrics);
3. the name: losses, perplexities, bits per byte, error rates and ranks are lower-is-better; anything else
   (accuracies, exact match, F1, probabilities) higher-is-better.
"""

from __future__ import annotations

import re

import pandas as pd

# Name parts that mean lower is better. Matched against the metric's last path part without its filter
# (``arc_easy/acc,none`` -> ``acc``; ``eval/loss`` -> ``loss``; ``wikitext/word_perplexity,none`` -> ...).
_LOWER = re.compile(
    r"(^|_)(loss|nll|ce|perplexity|ppl|bpb|bits_per_byte|bits_per_token|error|err|wer|cer|ter|rank|"
    r"expected_calibration_error|ece|brier|forgetting)($|_)"
)
_HIGHER_OVERRIDES = {"reciprocal_rank", "mrr", "rank_correlation"}
# lm-eval metrics whose tasks declare lower as better though their names do not say so (CrowS-Pairs' bias scores).
_LOWER_NAMES = {"pct_stereotype", "likelihood_difference"}


def _short(metric: str) -> str:
    return metric.rsplit("/", 1)[-1].split(",", 1)[0].lower()


def direction_from_name(metric: str) -> bool:
    """True when a higher value of ``metric`` is better, judged from its name alone (step 3 above)."""
    short = _short(metric)
    if short in _HIGHER_OVERRIDES or short.endswith("reciprocal_rank"):
        return True
    if short in _LOWER_NAMES:
        return False
    return _LOWER.search(short) is None


def higher_is_better(metric: str, frame: pd.DataFrame | None = None) -> bool:
    """True when a higher value of ``metric`` is better: declared, then registered, then by name."""
    if frame is not None and "higher_is_better" in frame.columns and "metric" in frame.columns:
        declared = frame.loc[frame["metric"].astype(str) == metric, "higher_is_better"].dropna()
        if len(declared):
            return bool(declared.astype(bool).mode().iloc[0])
    from analysis.metrics.registry import get_metric, metric_names  # torch is imported only when needed

    known = set(metric_names())
    for name in (metric, metric.rsplit("/", 1)[-1]):
        if name in known and get_metric(name).higher_is_better is not None:
            return bool(get_metric(name).higher_is_better)
    return direction_from_name(metric)


def orientation(metric: str, frame: pd.DataFrame | None = None) -> float:
    """+1.0 when higher is better, -1.0 when lower is: multiply a change by it to get an improvement."""
    return 1.0 if higher_is_better(metric, frame) else -1.0
