"""Metrics by name: what the command line, the job worker and the store call.

Each metric is a :class:`MetricSpec`: its name, a version (bump it when the numbers a
metric produces change, so cached values are recomputed), its family, whether a higher
value is better (None for controls without a preferred direction), whether it needs a
mixture-of-experts model, its frozen config class and its function

    fn(model, batches, config, *, device, seed[, progress]) -> MetricResult

A long metric declares its ``progress_unit`` ("probe", "iteration", ...) and takes
``progress(i, n)``, called after each of its n probes or iterations; it prints nothing.
Every metric takes a ``seed`` setting besides its config's fields (:func:`metric_settings`):
it is stored with the result and keyed into the cache like the config.

The registry is open: other modules add their metrics with :func:`register`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from analysis.metrics import alignment, flatness, pathways
from analysis.metrics.common import Batch, MetricResult

MetricFn = Callable[..., MetricResult]
ParamValue = str | int | float | bool | None


@dataclass(frozen=True)
class MetricSpec:
    """A registered metric."""

    name: str
    version: str
    family: str
    higher_is_better: bool | None
    needs_moe: bool
    config_cls: type
    fn: MetricFn
    description: str = ""
    # For routing metrics: the same value from a RoutingProfile, (profile, config, seed) -> MetricResult,
    # so several routing metrics on one checkpoint share one forward pass.
    from_profile: Callable[..., MetricResult] | None = None
    # For long metrics: what one step of their progress(i, n) counts ("probe", "iteration", ...);
    # empty for metrics that take no progress callback.
    progress_unit: str = ""


_REGISTRY: dict[str, MetricSpec] = {}


def register(spec: MetricSpec, *, replace: bool = False) -> MetricSpec:
    """Add a metric. A second registration under the same name is an error unless ``replace``."""
    if not dataclasses.is_dataclass(spec.config_cls):
        raise TypeError(f"metric {spec.name!r}: config_cls must be a dataclass, got {spec.config_cls!r}")
    if spec.name in _REGISTRY and not replace:
        raise ValueError(f"metric {spec.name!r} is already registered; pass replace=True to override it")
    _REGISTRY[spec.name] = spec
    return spec


def metric_names() -> list[str]:
    """Every registered metric name, sorted."""
    return sorted(_REGISTRY)


def get_metric(name: str) -> MetricSpec:
    """The spec of ``name``; KeyError with the closest registered name for a typo."""
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"known metrics: {', '.join(metric_names())}"
        raise KeyError(f"unknown metric {name!r}; {hint}") from None


# --- configs from key=value strings ------------------------------------------------------------------

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}
_NONE = {"none", "null", ""}


def _convert(value: ParamValue, kind: Any, where: str) -> Any:
    """Convert a CLI-style value to the field's annotated type, or raise ValueError."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        if type(None) in options and (value is None or (isinstance(value, str) and value.strip().lower() in _NONE)):
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, where)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(errors[0] if errors else f"{where}: cannot convert {value!r}")
    if origin is typing.Literal:
        choices = typing.get_args(kind)
        if value not in choices:
            raise ValueError(f"{where}: must be one of {', '.join(map(repr, choices))}, got {value!r}")
        return value
    text = value.strip() if isinstance(value, str) else None
    if kind is bool:
        if isinstance(value, bool):
            return value
        if text is not None and text.lower() in _TRUE | _FALSE:
            return text.lower() in _TRUE
        raise ValueError(f"{where}: expected true or false, got {value!r}")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        number: float | None = None
        if isinstance(value, float):
            number = value
        elif text is not None:
            try:
                return int(text)
            except ValueError:
                try:
                    number = float(text)  # accept 1e5
                except ValueError:
                    number = None
        if number is not None and math.isfinite(number) and number.is_integer():
            return int(number)
        raise ValueError(f"{where}: expected an integer, got {value!r}")
    if kind is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if text is not None:
            try:
                return float(text)
            except ValueError:
                pass
        raise ValueError(f"{where}: expected a number, got {value!r}")
    if kind is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"{where}: expected text, got {value!r}")
    raise ValueError(f"{where}: fields of type {kind!r} cannot be set from the command line")


# The one setting every metric takes besides its config's fields.
SEED = "seed"


def progress_unit(name: str) -> str:
    """What metric ``name``'s progress(i, n) counts ("probe", "iteration", ...), "step" if it reports none."""
    return get_metric(name).progress_unit or "step"


def metric_settings(name: str, params: Mapping[str, ParamValue] | None = None) -> tuple[Any, int | None]:
    """Metric ``name``'s config from key=value params, and its own ``seed`` when one is given.

    ``seed`` (a non-negative integer) is accepted by every metric: it seeds the metric's probe
    draws and overrides a job-wide seed for this metric. The other keys go to :func:`make_config`.
    """
    params = dict(params or {})
    seed = None
    if SEED in params:
        seed = _convert(params.pop(SEED), int, f"metric {name!r}, parameter 'seed'")
        if seed < 0:
            raise ValueError(f"metric {name!r}, parameter 'seed': must be >= 0, got {seed}")
    return make_config(name, params), seed


def make_config(name: str, params: Mapping[str, ParamValue] | None = None) -> Any:
    """Build metric ``name``'s config from ``key=value`` style params.

    Values may be strings (as typed on a command line) or already-typed numbers and
    booleans; they are converted to each field's annotated type. Unknown keys, values of
    the wrong type and values the config rejects raise ValueError naming the metric and
    the key. Missing keys keep their defaults. ``seed`` is not a config field: it goes through
    :func:`metric_settings`.
    """
    spec = get_metric(name)
    cls = spec.config_cls
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in (params or {}).items():
        if key == SEED and key not in fields:
            raise ValueError(f"metric {name!r}: 'seed' is not a config field; pass the params to metric_settings")
        if key not in fields:
            known = [*fields, SEED]  # seed is valid everywhere (metric_settings)
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            valid = ", ".join(known)
            raise ValueError(f"unknown parameter {key!r} for metric {name!r}; {hint}valid parameters: {valid}")
        kwargs[key] = _convert(value, hints[key], f"metric {name!r}, parameter {key!r}")
    try:
        return cls(**kwargs)
    except ValueError as err:
        raise ValueError(f"metric {name!r}: {err}") from None


def compute(
    name: str,
    model: nn.Module,
    batches: Sequence[Batch],
    config: Any = None,
    *,
    device: torch.device | str = "cpu",
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> MetricResult:
    """Evaluate metric ``name`` on ``model`` over ``batches``.

    ``config`` may be None (defaults), a mapping of key=value params (see
    :func:`metric_settings`; a ``seed`` there overrides ``seed``) or the metric's config
    instance. ``progress(i, n)`` follows a long metric's probes or iterations (ignored by
    metrics without a ``progress_unit``). The result's ``extra["version"]`` is the metric's
    registered version.
    """
    spec = get_metric(name)
    if config is None:
        config = spec.config_cls()
    elif isinstance(config, Mapping):
        config, own_seed = metric_settings(name, config)
        seed = own_seed if own_seed is not None else seed
    elif not isinstance(config, spec.config_cls):
        raise TypeError(
            f"metric {name!r} takes a {spec.config_cls.__name__} config, got {type(config).__name__}; "
            "pass the params as a dict to have it built"
        )
    if spec.progress_unit and progress is not None:
        result = spec.fn(model, batches, config, device=device, seed=seed, progress=progress)
    else:
        result = spec.fn(model, batches, config, device=device, seed=seed)
    return dataclasses.replace(result, extra={**result.extra, "version": spec.version})


def compute_from_profile(name: str, profile: pathways.RoutingProfile, config: Any = None, *, seed: int = 0):
    """A routing metric scored on an already captured :class:`RoutingProfile` (no forward pass)."""
    spec = get_metric(name)
    if spec.from_profile is None:
        raise ValueError(f"metric {name!r} is not a routing metric; it needs the model, use compute()")
    if config is None or isinstance(config, Mapping):
        config, own_seed = metric_settings(name, config or {})
        seed = own_seed if own_seed is not None else seed
    result = spec.from_profile(profile, config, seed)
    return dataclasses.replace(result, extra={**result.extra, "version": spec.version})


# --- the built-in metrics ---------------------------------------------------------------------------------


def _register_builtins() -> None:
    # Versions: 2 for the probe-based estimates (stderr over batch means, each batch with
    # its own noise draws) and the eigenvalue (converged by residual, not relative change).
    # Annotated: the metric functions differ in their config argument, so the inferred join is a bare function.
    flat: list[tuple[str, str, type, MetricFn, str, str]] = [
        (
            "hessian_trace",
            "2",
            flatness.HessianTraceConfig,
            flatness.hessian_trace,
            "Hutchinson trace per token",
            "probe",
        ),
        (
            "hessian_top_eigenvalue",
            "2",
            flatness.HessianEigenConfig,
            flatness.hessian_top_eigenvalue,
            "largest Hessian eigenvalue (power iteration or Lanczos), with its residual",
            "iteration",
        ),
        (
            "fisher_trace",
            "2",
            flatness.FisherTraceConfig,
            flatness.fisher_trace,
            "Fisher trace per token, sampled labels",
            "draw",
        ),
        (
            "adaptive_sharpness",
            "2",
            flatness.AdaptiveSharpnessConfig,
            flatness.adaptive_sharpness,
            "E[L(w+d)] - L(w), d ~ N(0, (rho|w|)^2)",
            "draw",
        ),
        (
            "perturbation_sensitivity",
            "2",
            flatness.PerturbationConfig,
            flatness.perturbation_sensitivity,
            "loss increase under relative Gaussian weight noise",
            "draw",
        ),
        ("sam_sharpness", "1", flatness.SamConfig, flatness.sam_sharpness, "one-step SAM/ASAM sharpness", ""),
    ]
    for name, version, cls, fn, text, unit in flat:
        register(MetricSpec(name, version, "flatness", False, False, cls, fn, text, progress_unit=unit))
    moe: list[tuple[str, type, MetricFn, bool | None, str]] = [
        (
            "pathway_distance",
            pathways.PathwayDistanceConfig,
            pathways.pathway_distance,
            False,
            "mean Levenshtein distance between expert pathways (token form)",
        ),
        (
            "pathway_distance_chars",
            pathways.PathwayDistanceConfig,
            pathways.pathway_distance_chars,
            False,
            "mean Levenshtein distance between expert pathways (character form)",
        ),
        (
            "pathway_consistency",
            pathways.RoutingConfig,
            pathways.pathway_consistency,
            True,
            "mean cosine of consecutive layers' routed expert embeddings",
        ),
        (
            "pathway_consistency_normalized",
            pathways.RoutingConfig,
            pathways.pathway_consistency_normalized,
            True,
            "pathway consistency with each cosine divided by the sample's largest",
        ),
        (
            "routing_entropy",
            pathways.RoutingConfig,
            pathways.routing_entropy,
            None,
            "router entropy / ln E (a control)",
        ),
        (
            "expert_load",
            pathways.RoutingConfig,
            pathways.expert_load,
            True,
            "balance of top-k assignments over experts, entropy / ln E (a control)",
        ),
    ]
    for name, cls, fn, better, text in moe:
        register(MetricSpec(name, "1", "pathways", better, True, cls, fn, text, pathways.FROM_PROFILE[name]))
    register(
        MetricSpec(
            "gradient_alignment",
            "1",
            "alignment",
            True,
            False,
            alignment.GradientAlignmentConfig,
            alignment.gradient_alignment,
            "mean cosine between domains' loss gradients; diagonal = same-domain half-split ceiling",
            progress_unit="gradient",
        )
    )


_register_builtins()
