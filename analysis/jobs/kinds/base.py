"""The interface every kind of job work implements, the registry of kinds, and a unit's typed context.

A kind is one class (``WorkKind``) that answers four questions about the items it owns: which items
a request plans (``plan``), which stored metric names an item produces (``produces``, so the runner
tells what is cached without loading anything), which items may share one Ray task (``group``),
and the rows an item computes on a loaded checkpoint (``compute``). Items name their kind by the
kind's ``name``; both executors look it up here (``get_kind``).
"""

from __future__ import annotations

import difflib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar

import torch

from analysis.jobs.spec import Item, JobSpec
from analysis.store import ResultRow, SampleRow

# progress(i, n) of a long item: after each probe, iteration or fine-tuning step.
ItemProgress = Callable[[int, int], None]
Batch = dict[str, torch.Tensor]


def probe_batches(probe, spec: JobSpec, pad_id: int = 0) -> list[Batch]:
    """The fixed probe batches every checkpoint of the run is measured on.

    At most ``batch_size * metric_batches`` samples in all, shared round-robin among the
    domains (sorted by name) so that every domain is represented (while there are no more
    domains than samples allowed); a domain with fewer samples than its share leaves the
    rest to the others. Each domain gives its first samples in probe order. Batches never
    mix domains, and each carries ``domain_id`` (B,) long: the domain's index in sorted
    name order (0..D-1), which ``gradient_alignment`` reads and other metrics ignore.
    Padding is ``pad_id`` (the model's, :func:`analysis.models.pad_token_id`) under the
    attention mask.
    """
    from analysis.evals.heldout import right_pad

    names = sorted(probe.domains)
    sizes = [len(probe.domains[name]) for name in names]
    take = [0] * len(names)
    left = spec.batch_size * spec.metric_batches
    while left > 0 and any(t < n for t, n in zip(take, sizes, strict=True)):
        for i, n in enumerate(sizes):
            if left > 0 and take[i] < n:
                take[i] += 1
                left -= 1
    batches = []
    for index, (name, count) in enumerate(zip(names, take, strict=True)):
        seqs = [list(s) for s in probe.domains[name][:count]]
        for i in range(0, count, spec.batch_size):
            ids, mask = right_pad(seqs[i : i + spec.batch_size], pad_id)
            domain = torch.full((ids.shape[0],), index, dtype=torch.long)
            batches.append({"input_ids": ids, "attention_mask": mask, "domain_id": domain})
    if not batches:
        raise ValueError(f"{spec.data}: no usable probe samples (each needs at least 2 tokens)")
    return batches


@dataclass(frozen=True)
class UnitContext:
    """Everything an item may read on one loaded checkpoint. Built once per unit; nothing in it is mutated.

    The expensive parts are cached properties, built by the first item that reads them and shared
    by the rest: the probe set, its fixed batches, and the routing profile the routing metrics share.
    ``tokenizer`` may be a :class:`analysis.models.LazyTokenizer`: it loads when an item needs it.
    """

    spec: JobSpec
    model: torch.nn.Module
    tokenizer: Any
    step: int
    fingerprint: str
    checkpoint: str  # the checkpoint's folder: the fine-tune probe refuses to keep copies next to it
    versions: dict[str, str]  # library versions stored beside each value
    data: str | None = None  # the probe set the unit's items read (their ``Item.data``)

    @property
    def run(self) -> str:
        return self.spec.run

    @cached_property
    def device(self) -> torch.device:
        """Where the model's weights are: inputs go there."""
        return next(self.model.parameters()).device

    @cached_property
    def pad_id(self) -> int:
        from analysis.models import pad_token_id

        return pad_token_id(self.model)

    @cached_property
    def probe(self):
        """The probe set (:class:`analysis.evals.heldout.ProbeSet`), read and tokenised once per unit."""
        from analysis.evals.heldout import load_probe_set

        if self.data is None:
            raise ValueError("no probe data for this unit: pass --data with a JSONL/txt probe file or folder")
        spec = self.spec
        return load_probe_set(self.data, self.tokenizer, spec.max_length, max_samples=spec.max_samples)

    @cached_property
    def batches(self) -> list[Batch]:
        """The fixed probe batches (:func:`probe_batches`) the internal metrics share."""
        return probe_batches(self.probe, self.spec, self.pad_id)

    @cached_property
    def routing(self):
        """One routing profile over :attr:`batches`: every routing metric of the unit reads the same pass."""
        from analysis.metrics.pathways import routing_profile

        return routing_profile(self.model, self.batches, device=self.device)

    def row(
        self, item: Item, metric: str, value: float | None, stderr: float | None = None, n: int | None = None,
        code_version: str = "", higher_is_better: bool | None = None, converged: bool | None = None,
    ) -> ResultRow:  # fmt: skip
        """A result of ``item`` on this checkpoint, keyed by the item's parameters."""
        return ResultRow(
            self.run, self.step, metric, value, self.fingerprint, stderr, n, item.params, code_version,
            self.versions, converged=converged, higher_is_better=higher_is_better,
        )  # fmt: skip

    def sample(self, item: Item, metric: str, sample_id: str, value: float | None, record: dict) -> SampleRow:
        """A per-sample record behind a result of ``item`` on this checkpoint."""
        return SampleRow(self.run, self.step, metric, item.params_hash, sample_id, value, record)


Output = tuple[list[ResultRow], list[SampleRow]]


class WorkKind(ABC):
    """One kind of job work. To add a kind: subclass, fill in the four methods, decorate with ``@register``.

    ``name`` is what ``Item.kind`` holds. ``requests`` are the ``--metrics`` names that plan items of
    this kind (lm-eval tasks come from ``--tasks`` instead). ``uses_probe``: the unit reads the probe set
    before any item runs, so a broken probe file fails the whole unit with one reason.
    """

    name: ClassVar[str]
    requests: ClassVar[tuple[str, ...]] = ()
    uses_probe: ClassVar[bool] = False

    @abstractmethod
    def plan(self, spec: JobSpec, request: str) -> list[Item]:
        """The items ``request`` (a ``--metrics`` name, or a task for lm-eval) asks of every checkpoint."""

    @abstractmethod
    def produces(self, item: Item, metric: str) -> bool:
        """Whether stored metric name ``metric`` comes from ``item``."""

    @abstractmethod
    def compute(self, item: Item, ctx: UnitContext, progress: ItemProgress | None = None) -> Output:
        """The rows and per-sample records of ``item`` on the checkpoint in ``ctx``. Writes nothing."""

    def group(self, item: Item) -> str:
        """Items with the same key may share one Ray task (one checkpoint load); ``evaluations`` by default:
        the items that are forward passes over the data."""
        return "evaluations"

    def label(self, item: Item) -> str:
        """How progress notes and failure messages name ``item``."""
        return f"{self.name}:{item.name}"

    def progress_unit(self, item: Item) -> str:
        """What ``progress(i, n)`` counts for ``item``."""
        return "step"

    def request_names(self) -> Iterable[str]:
        """Every ``--metrics`` name this kind plans."""
        return self.requests

    def claims(self, request: str) -> bool:
        return request in self.request_names()


_KINDS: dict[str, WorkKind] = {}


def register(cls: type[WorkKind]) -> type[WorkKind]:
    """Class decorator: register a kind under its ``name``. A name or request taken twice is a ValueError."""
    kind = cls()
    taken = [r for k in _KINDS.values() for r in kind.request_names() if k.claims(r)]
    if kind.name in _KINDS or taken:
        what = f"request {taken[0]!r}" if taken else f"name {kind.name!r}"
        raise ValueError(f"work kind {cls.__name__}: {what} is already registered; pick another")
    _KINDS[kind.name] = kind
    return cls


def unregister(name: str) -> None:
    """Remove a kind (tests, plugins that are switched off); unknown names are ignored."""
    _KINDS.pop(name, None)


def adopt(kinds: Iterable[WorkKind]) -> None:
    """Register kinds shipped from another process (a Ray driver) that this one lacks; known names stay."""
    for kind in kinds:
        _KINDS.setdefault(kind.name, kind)


def kind_names() -> list[str]:
    return sorted(_KINDS)


def get_kind(name: str) -> WorkKind:
    """The kind registered as ``name``; KeyError with the closest name for a typo."""
    try:
        return _KINDS[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_KINDS), n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"known kinds: {', '.join(kind_names())}"
        raise KeyError(f"unknown work kind {name!r}; {hint}") from None


def kind_for_request(request: str) -> WorkKind:
    """The kind that plans ``--metrics`` name ``request``; KeyError with the closest name for a typo."""
    for kind in _KINDS.values():
        if kind.claims(request):
            return kind
    known = sorted({r for kind in _KINDS.values() for r in kind.request_names()})
    close = difflib.get_close_matches(request, known, n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"known metrics: {', '.join(known)}"
    raise KeyError(f"unknown metric {request!r}; {hint}")
