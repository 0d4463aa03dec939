"""One metric on one checkpoint folder, printed and not cached: for scripts and for checking numbers."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO

from analysis.jobs.spec import HELDOUT


def compute_once(
    name: str,
    checkpoint: str | Path,
    data: str | Path,
    *,
    params: Sequence[str] = (),
    device: str = "auto",
    seed: int = 0,
    max_length: int = 64,
    max_samples: int | None = 256,
    batch_size: int = 16,
    batches: int = 2,
    progress: Callable[[int, int], None] | None = None,
    dtype: str | None = None,
) -> dict:
    """Compute metric ``name`` on the model in ``checkpoint`` over the probe data in ``data``.

    Returns a JSON-ready dict with at least ``metric``, ``value`` and ``stderr``. ``params``
    are KEY=VALUE strings for the metric's config, plus ``seed`` (overrides ``seed``).
    The checkpoint's tokenizer is loaded only when a text probe sample needs it, so
    ``input_ids`` probes work on checkpoints without tokenizer files. ``progress(i, n)``
    follows a long metric's probes or iterations. ``dtype`` (float32, bfloat16, float16) overrides the
    dtype chosen for the device (:func:`analysis.models.compute_dtype_for`); the output says which ran.
    """
    from analysis.evals.heldout import heldout_loss, load_probe_set
    from analysis.jobs.kinds import probe_batches
    from analysis.jobs.precision import metric_purpose
    from analysis.jobs.spec import JobSpec
    from analysis.models import compute_dtype_for, dtype_name, load_model, pad_token_id, stored_dtype

    settings: dict[str, str] = {}
    for item in params:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"--param {item!r}: write KEY=VALUE")
        settings[key] = text
    if name == HELDOUT:
        extra = sorted(set(settings) - {"seed"})  # deterministic: a seed is accepted and changes nothing
        if extra:
            raise ValueError(f"--param {extra[0]}: heldout_loss takes no parameters; drop it")
    else:
        from analysis.metrics.registry import get_metric, metric_settings

        get_metric(name)  # unknown names fail before the model loads
        config, own_seed = metric_settings(name, settings)
        seed = seed if own_seed is None else own_seed
    # The dtype a job would compute this metric in on this device: the same number as a cached one.
    dtype_used = compute_dtype_for(device, stored_dtype(checkpoint), metric_purpose(name), requested=dtype)
    model, tokenizer = load_model(checkpoint, device=device, dtype=dtype_used, lazy_tokenizer=True)
    probe = load_probe_set(data, tokenizer, max_length, max_samples=max_samples)

    clean = _clean

    if name == HELDOUT:
        results = heldout_loss(model, probe, batch_size=batch_size)
        total = sum(r.n_tokens for r in results.values())
        value = sum(r.mean_nll * r.n_tokens for r in results.values()) / total
        domains = {d: {"value": r.mean_nll, "stderr": clean(r.stderr), "bits_per_byte": r.bits_per_byte,
                       "n_tokens": r.n_tokens, "n_samples": r.n_samples} for d, r in results.items()}  # fmt: skip
        for d, fields in domains.items():
            if fields["bits_per_byte"] is None and probe.n_bytes.get(d) is None:  # token-id samples
                fields["bits_per_byte_note"] = _NO_BYTES + ("" if tokenizer.available else _NO_TOKENIZER)
        stderr = next(iter(domains.values()))["stderr"] if len(domains) == 1 else None
        return {"metric": name, "value": value, "stderr": stderr, "n": probe.n_samples, "domains": domains,
                "probe_fingerprint": probe.fingerprint, "dtype": dtype_name(dtype_used)}  # fmt: skip
    from analysis.metrics.registry import compute

    spec = JobSpec(run="-", metrics=(name,), batch_size=batch_size, metric_batches=batches, data=str(data))
    result = compute(name, model, probe_batches(probe, spec, pad_token_id(model)), config,
                     device=next(model.parameters()).device, seed=seed, progress=progress)  # fmt: skip
    return {
        "metric": name,
        "value": clean(result.value),
        "stderr": clean(result.stderr),
        "n": result.n,
        **estimate_fields(result),
        "params": result.params,
        "per_probe": [clean(v) for v in result.per_probe],
        "probe_fingerprint": probe.fingerprint,
        "dtype": dtype_name(dtype_used),
    }


_NO_BYTES = "unavailable: input_ids samples carry no text whose bytes could be counted; give text samples"
_NO_TOKENIZER = " (and this checkpoint has no tokenizer files to tokenise them: save its tokenizer there)"


def progress_printer(name: str, *, stream: TextIO | None = None) -> Callable[[int, int], None] | None:
    """How ``metric`` shows a long metric's progress on ``stream`` (stderr): a tqdm bar on a
    terminal, else lines like "hessian_trace: probe 3/32" (the first, the last, and about every
    5% between). None for metrics that report no progress (held-out loss, routing metrics)."""
    from analysis.metrics.registry import get_metric

    if name == HELDOUT or not get_metric(name).progress_unit:
        return None
    unit = get_metric(name).progress_unit
    out = stream if stream is not None else sys.stderr
    if out.isatty():
        from tqdm import tqdm

        state: dict = {}

        def bar(i: int, n: int) -> None:
            if "bar" not in state:
                state["bar"] = tqdm(total=n, desc=name, unit=unit, file=out, dynamic_ncols=True)
            state["bar"].total = n
            state["bar"].update(i - state["bar"].n)
            if i >= n:
                state["bar"].close()

        return bar

    def lines(i: int, n: int) -> None:
        if i in (1, n) or (i * 20) // n != ((i - 1) * 20) // n:
            print(f"{name}: {unit} {i}/{n}", file=out, flush=True)

    return lines


def _clean(x):
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else x


def estimate_fields(result) -> dict:
    """What a MetricResult says about its own reliability, JSON-ready.

    For a stderr: what it covers (``stderr_covers`` and a sentence, ``stderr_note``), its
    degrees of freedom and the 95% interval from :func:`analysis.metrics.common.interval`.
    For an iterative estimate: ``iterations``, ``residual``, ``converged``, Lanczos' ``reorthogonalisation``
    ("full" or "none") and, when it did not converge, what to do (``convergence_note``). Empty for other metrics.
    """
    from analysis.metrics.common import STDERR_NOTES, interval

    out: dict = {}
    if result.stderr is not None and result.stderr_covers is not None:
        out["stderr_covers"] = result.stderr_covers
        out["stderr_note"] = STDERR_NOTES[result.stderr_covers]
        out["dof"] = result.dof
        if math.isfinite(result.value) and math.isfinite(result.stderr):
            low, high = interval(result.value, result.stderr, result.dof, 0.95)
            out["interval_95"] = [low, high]
            out["interval_quantile"] = "normal" if result.dof is None else f"t, {result.dof} dof"
    if result.converged is not None:
        out["iterations"] = result.iterations
        out["residual"] = _clean(result.residual)
        out["converged"] = result.converged
        if "reorthogonalisation" in result.extra:  # Lanczos: which mode its basis budget allowed
            out["reorthogonalisation"] = result.extra["reorthogonalisation"]
        if not result.converged:
            # Switching method helps only from power iteration: Lanczos needs about a fifth of its products.
            fix = "raise max_iter or use method=lanczos" if result.params.get("method") == "power" else "raise max_iter"
            out["convergence_note"] = (
                f"not converged: residual {result.residual:.3g} > tol {result.params.get('tol')} after "
                f"{result.iterations} Hessian-vector products; {fix}"
            )
    return out
