"""The evaluations: lm-eval tasks (with their continuous counterparts), held-out loss, token-level proxies.

All three are forward passes over data, so Ray computes them in one task per checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from analysis.jobs.kinds.base import ItemProgress, Output, UnitContext, WorkKind, register
from analysis.jobs.spec import (
    HELDOUT,
    HELDOUT_VERSION,
    PROXY,
    Item,
    JobSpec,
    _task_digest,
    _task_scopes,
    probe_data,
    probe_params,
    probe_path,
)


@register
class LmEvalKind(WorkKind):
    """One lm-eval task (a name or a task YAML), stored as ``<task>/<metric>,<filter>``."""

    name = "lm_eval"

    def plan(self, spec: JobSpec, request: str) -> list[Item]:
        params = {
            "task": request,
            "task_digest": _task_digest(request),
            "limit": spec.limit,
            "num_fewshot": spec.num_fewshot,
            "seed": spec.seed,
            "bootstrap_iters": spec.bootstrap_iters,
        }
        return [Item(self.name, request, params, _task_scopes(request))]

    def produces(self, item: Item, metric: str) -> bool:
        # A YAML path stores under the YAML's task names (its scopes); proxies share the task's prefix.
        scope, _, leaf = metric.partition("/")
        return scope in (item.scopes or (item.name,)) and not leaf.startswith(("proxy_", "heldout_"))

    def label(self, item: Item) -> str:
        return item.name

    def compute(self, item: Item, ctx: UnitContext, progress: ItemProgress | None = None) -> Output:
        from analysis.evals.continuous import continuous_metrics
        from analysis.evals.lmeval import run_lm_eval
        from analysis.models import resolve_tokenizer

        spec = ctx.spec
        tok = resolve_tokenizer(ctx.tokenizer, f"the prompts of {item.name}")
        out = run_lm_eval(
            ctx.model,
            tok,
            [item.name],
            batch_size=spec.batch_size,
            limit=spec.limit,
            num_fewshot=spec.num_fewshot,
            log_samples=spec.log_samples,
            seed=spec.seed,
            bootstrap_iters=spec.bootstrap_iters,
        )
        rows, samples = [], []
        for r in out.rows:
            version = f"{r.task_version or ''};n_shot={r.n_shot}"
            rows.append(ctx.row(item, f"{r.task}/{r.metric}", r.value, r.stderr, r.n, version, r.higher_is_better))
        for s in out.samples:
            record: dict[str, Any] = {"target": s.target, "prompt": s.prompt, "response": s.response}
            if s.choices is not None:
                record["choices"] = list(s.choices)
                record["loglikelihoods"] = list(s.loglikelihoods or ())
            samples.append(ctx.sample(item, f"{s.task}/{s.metric}", str(s.doc_id), s.value, record))
        # The accuracy's continuous counterparts, from the same per-choice log-likelihoods: no second pass.
        encode = lambda text: tok.encode(text, add_special_tokens=False)  # noqa: E731
        for c in continuous_metrics(out.samples, encode):
            rows.append(ctx.row(item, c.metric, c.value, c.stderr, c.n, "continuous-1"))
        return rows, samples


@register
class HeldoutKind(WorkKind):
    """Held-out loss, perplexity and bits per byte of every domain of the probe set."""

    name = "heldout"
    requests = (HELDOUT,)
    uses_probe = True

    def plan(self, spec: JobSpec, request: str) -> list[Item]:
        return [
            Item(
                self.name,
                Path(probe_data(spec)).name,
                {**probe_params(spec), "version": HELDOUT_VERSION},
                data=probe_path(spec),
            )
        ]

    def produces(self, item: Item, metric: str) -> bool:
        return metric.partition("/")[2].startswith("heldout_")  # one row set per domain of the probe data

    def compute(self, item: Item, ctx: UnitContext, progress: ItemProgress | None = None) -> Output:
        from analysis.evals.heldout import heldout_loss

        rows = []
        for domain, res in heldout_loss(ctx.model, ctx.probe, batch_size=ctx.spec.batch_size).items():
            rows.append(ctx.row(item, f"{domain}/heldout_loss", res.mean_nll, res.stderr, res.n_samples, "1"))
            rows.append(ctx.row(item, f"{domain}/heldout_perplexity", res.perplexity, None, res.n_samples, "1"))
            if res.bits_per_byte is not None:
                rows.append(ctx.row(item, f"{domain}/heldout_bpb", res.bits_per_byte, None, res.n_samples, "1"))
        return rows, []


@register
class ProxyKind(WorkKind):
    """Token-level proxies over a bundled task's expert solutions, stored as ``<task>/proxy_<statistic>``."""

    name = "proxy"
    requests = (PROXY,)

    def plan(self, spec: JobSpec, request: str) -> list[Item]:
        from analysis.evals.tasks import BUNDLED_TASKS

        # The bundled tasks the job evaluates, else all of them.
        tasks = [t for t in spec.tasks if t in BUNDLED_TASKS] or list(BUNDLED_TASKS)
        return [
            Item(self.name, task, {"task": task, "task_digest": _task_digest(task), "weighting": "uniform"})
            for task in tasks
        ]

    def produces(self, item: Item, metric: str) -> bool:
        scope, _, leaf = metric.partition("/")
        return scope == item.name and leaf.startswith("proxy_")

    def compute(self, item: Item, ctx: UnitContext, progress: ItemProgress | None = None) -> Output:
        from analysis.evals.proxy import proxy_metrics
        from analysis.evals.tasks import bundled_proxy_items
        from analysis.models import resolve_tokenizer

        pairs = bundled_proxy_items(item.name)[: ctx.spec.limit or None]
        tok = resolve_tokenizer(ctx.tokenizer, f"the solutions of {item.name}")
        results = proxy_metrics(ctx.model, tok, pairs, batch_size=ctx.spec.batch_size)
        return [ctx.row(item, f"{item.name}/{name}", r.value, r.stderr, r.n, "1") for name, r in results.items()], []
