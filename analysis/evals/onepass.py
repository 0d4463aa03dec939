"""lm-eval loglikelihood scoring with one forward pass per context.

lm-eval's HF backend (``HFLM``) runs one forward pass per (context, continuation) request, so a
multiple-choice item with four multi-token choices computes its shared context four times. Its
logits cache only merges requests whose continuations differ in their last token alone.

:class:`OnePassLM` is ``HFLM`` with another loglikelihood path: requests are grouped by their context
token ids; a batch of distinct contexts goes through the model once (keeping its key/value cache),
then every continuation of those contexts is scored in one more forward from a copy of that cache.
It returns what ``HFLM`` returns, (summed log-probability of the continuation, whether every token
was the greedy one), per request, in request order, equal to ``HFLM``'s to float rounding (the
tests hold it to 1e-6 in float32). ``generate_until`` and ``loglikelihood_rolling`` are ``HFLM``'s.

The backend is registered with lm-eval as ``cdd-onepass``, so lm-eval's own task code can drive it:
``simple_evaluate(model="cdd-onepass", model_args="pretrained=DIR,onepass=always", ...)``.

Where it pays (``onepass="auto"``, the default), decided per task from the requests' token counts
and the model's shape: the shared context, and the output layer over it, must be a large part of
what ``HFLM`` would compute (see :func:`work_saving` and ``bench/mc_scoring.py``). Single-token
choices on a small vocabulary do not pay (``HFLM``'s logits cache already scores them from one
pass per context), nor do choices much longer than their context. Requests that ``HFLM`` truncates
(context + continuation longer than the model's window) and models whose cache this cannot copy
go to ``HFLM``'s path unchanged.
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM, eval_logger

if TYPE_CHECKING:
    from transformers import PreTrainedModel

BACKEND_NAME = "cdd-onepass"
POLICIES = ("auto", "always")

# A task is scored in one pass per context when HFLM's path would do at least this many times
# the work (see work_saving). From bench/mc_scoring.py (GPT-NeoX width 384, 6 layers, one CPU
# thread, medians of 3): where the estimate was 0.84-1.03 (one-word choices on a word vocabulary;
# 1-3-word contexts with 8-word choices) one pass ran 0.79-1.04x HFLM's speed; at 1.54-1.75
# (3-word contexts, 3-word choices) 1.38-1.54x; at 2.1-9.2 (8-128-word contexts, or one-word
# choices on Pythia's 50k vocabulary) 1.54-6.8x. Below ~1.3 the second forward per batch and the
# cache copies eat what the shared context saves.
MIN_SAVING = 1.3

# Continuation rows are short (the choice's tokens), so one forward takes several choices per
# context of a batch_size batch of contexts: the usual four choices of a batch in one pass.
_CONT_ROWS_PER_CONTEXT = 4

Request = tuple[tuple[str, str], list[int], list[int]]  # (context, continuation) strings, their token ids


def head_weight(model: PreTrainedModel) -> float:
    """The output layer's cost per position over the rest of the model's cost per token.

    Both from parameter counts (a matmul costs 2 FLOPs per weight per row): vocabulary x width
    against every weight that is neither embedding nor output layer. For mixture-of-experts
    models the body counts every expert, not the active ones: the weight comes out low, which
    only makes ``auto`` keep more tasks on HFLM's path.
    """
    embedding = _weight(model.get_input_embeddings())
    head = model.get_output_embeddings()
    output = _weight(head) if head is not None else embedding
    total = sum(p.numel() for p in model.parameters())  # tied weights are counted once
    body = total - embedding.numel() - (0 if output is embedding else output.numel())
    return output.numel() / max(body, 1)


def _weight(layer: torch.nn.Module) -> torch.Tensor:
    """An embedding or output layer's weight matrix (a Module attribute types as tensor or submodule)."""
    weight = layer.weight
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{type(layer).__name__}.weight is not a tensor; cannot size the output layer")
    return weight


def work_saving(requests: list[Request], head: float = 0.0) -> float:
    """How many times the work of one pass per context HFLM's path does for ``requests``.

    Work = tokens through the model's body + ``head`` (see :func:`head_weight`) x positions
    projected onto the vocabulary. HFLM forwards context + continuation minus its last token
    once per request (once per group of requests differing only in that last token, its logits
    cache) and projects every position. One pass forwards each distinct context once and
    ``len(cont) - 1`` tokens of each continuation (the context's last position predicts its first
    token), and projects only the positions it scores.
    """
    hf = sum(len(key) for key in {tuple(ctx + cont[:-1]) for _, ctx, cont in requests}) * (1 + head)
    contexts = {tuple(ctx) for _, ctx, _ in requests}
    tails = sum(len(cont) - 1 for _, _, cont in requests)
    ours = sum(len(ctx) for ctx in contexts) + tails + head * (len(contexts) + tails)
    return hf / ours if ours else 1.0


@register_model(BACKEND_NAME)
class OnePassLM(HFLM):
    """``HFLM`` whose loglikelihood requests share one forward pass per distinct context.

    ``onepass``: "auto" scores a task this way only where :func:`work_saving` says it pays;
    "always" scores every request it can this way (the tests use it to compare with HFLM).
    Everything else, and every keyword argument, is ``HFLM``'s. After a call, ``paths`` maps
    each task name to the path that scored it ("onepass" or "hf").
    """

    def __init__(self, *args: Any, onepass: str = "auto", **kwargs: Any) -> None:
        if onepass not in POLICIES:
            raise ValueError(f"onepass must be one of {', '.join(POLICIES)}, got {onepass!r}")
        super().__init__(*args, **kwargs)
        self.onepass = onepass
        self.paths: dict[str, str] = {}
        self._cache_ok: bool | None = None  # probed once, on first use

    # ------------------------------------------------------------------ dispatch

    def _encode(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        # The same split as lm-eval's TemplateLM.loglikelihood, so both paths see the same ids.
        if context:
            return self._encode_pair(context, continuation)
        cont = self.tok_encode(continuation, add_special_tokens=False)
        if cont and cont[0] != self.prefix_token_id:
            return [self.prefix_token_id], cont
        return cont[:1], cont[1:]  # the continuation starts with the prefix token: it is the context

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(summed log-probability, is greedy) of each request's continuation, in request order."""
        if self.backend != "causal" or not isinstance(self.batch_size, int) or self.enable_thinking:
            # seq2seq, batch_size="auto", and enable_thinking (which HFLM refuses here) stay HFLM's.
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm)
        encoded: list[Request] = []
        by_task: dict[str, list[int]] = defaultdict(list)
        for i, req in enumerate(requests):
            context, continuation = req.args
            ctx, cont = self._encode(context, continuation)
            if not cont:
                raise ValueError(
                    f"loglikelihood request {i} (context {context[-40:]!r}, continuation {continuation!r:.40}) "
                    "has an empty continuation; every choice must encode to at least one token"
                )
            encoded.append(((context, continuation), ctx, cont))
            by_task[str(req.task_name)].append(i)

        ours: list[int] = []
        theirs: list[int] = []
        for task, idx in by_task.items():
            fits = [i for i in idx if len(encoded[i][1]) + len(encoded[i][2]) <= self.max_length + 1]
            saving = work_saving([encoded[i] for i in fits], head_weight(self.model)) if fits else 1.0
            wanted = self.onepass == "always" or saving >= MIN_SAVING
            use = bool(fits) and wanted and self._cache_supported()
            self.paths[task] = "onepass" if use else "hf"
            chosen = set(fits) if use else set()
            ours += [i for i in idx if i in chosen]
            theirs += [i for i in idx if i not in chosen]  # HFLM truncates what does not fit, as it always does

        results: list[tuple[float, bool] | None] = [None] * len(requests)
        if theirs:
            done = super()._loglikelihood_tokens([encoded[i] for i in theirs], disable_tqdm=disable_tqdm)
            for i, answer in zip(theirs, done, strict=True):
                results[i] = answer
        if ours:
            for i, answer in zip(ours, self._onepass_tokens([encoded[i] for i in ours]), strict=True):
                results[i] = answer
        return results  # type: ignore[return-value]

    # ------------------------------------------------------------------ the model calls

    def _forward(self, **inputs: Any) -> Any:
        with (
            torch.no_grad(),
            torch.autocast(
                device_type=self.device.type,
                dtype=self.mixed_precision_dtype,
                enabled=self.mixed_precision_dtype is not None,
            ),
        ):
            return self.model(**inputs)

    @staticmethod
    def _copy_rows(cache: Any, rows: torch.Tensor) -> Any:
        """A new DynamicCache holding ``rows`` of ``cache`` (rows may repeat): the forward appends to it."""
        from transformers import DynamicCache

        return DynamicCache([(layer.keys[rows], layer.values[rows]) for layer in cache.layers])

    def _cache_supported(self) -> bool:
        """Whether this model's cache can be copied per continuation and gives HFLM's logits.

        Checked once on a four-token input, with the calls :meth:`_score_batch` makes: logits of the
        second position (kept alone) from a forward over two tokens, and of the last two from a
        copied cache, must match one plain forward. Sliding-window, static,
        quantised or recurrent caches, and models that take no position ids, go to HFLM's path.
        """
        if self._cache_ok is not None:
            return self._cache_ok
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        vocab = int(self.model.get_input_embeddings().weight.shape[0])
        ids = torch.tensor([[self.prefix_token_id, 3, 5, 7]], device=self.device) % vocab
        reason = ""
        try:
            full = self._forward(input_ids=ids).logits.float()
            head = self._forward(
                input_ids=ids[:, :2], use_cache=True, logits_to_keep=torch.tensor([1], device=self.device)
            )
            cache = head.past_key_values
            if type(cache) is not DynamicCache or any(type(layer) is not DynamicLayer for layer in cache.layers):
                reason = f"its cache is a {type(cache).__name__}, not a DynamicCache of full layers"
            else:
                tail = self._forward(
                    input_ids=ids[:, 2:],
                    past_key_values=self._copy_rows(cache, torch.tensor([0], device=self.device)),
                    attention_mask=torch.ones(1, 4, dtype=torch.long, device=self.device),
                    position_ids=torch.tensor([[2, 3]], device=self.device),
                    use_cache=True,
                ).logits.float()
                got = torch.cat([head.logits.float(), tail], dim=1)
                # Loose on purpose: this catches a cache used wrongly, not float rounding.
                if got.shape != full[:, 1:].shape or not torch.allclose(got, full[:, 1:], atol=1e-3, rtol=1e-3):
                    reason = "logits from its cache differ from a plain forward"
        except (TypeError, ValueError, AttributeError, RuntimeError) as err:
            reason = f"a forward with a copied cache failed ({type(err).__name__}: {err})"
        if reason:
            eval_logger.warning(f"{BACKEND_NAME}: {type(self.model).__name__}: {reason}; scoring as HFLM does")
        self._cache_ok = not reason
        return self._cache_ok

    def _onepass_tokens(self, requests: list[Request]) -> list[tuple[float, bool]]:
        """Score ``requests`` (all fit the window, none empty) with one forward per batch of contexts."""
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, (_, ctx, _) in enumerate(requests):
            groups[tuple(ctx)].append(i)
        # Longest contexts first, as HFLM does: a batch too big for memory fails at once.
        contexts = sorted(groups, key=lambda c: (-len(c), c))
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        size = self.batch_size
        for start in range(0, len(contexts), size):
            batch = contexts[start : start + size]
            self._score_batch(batch, groups, requests, out)
        return out  # type: ignore[return-value]

    def _score_batch(
        self,
        batch: list[tuple[int, ...]],
        groups: dict[tuple[int, ...], list[int]],
        requests: list[Request],
        out: list[tuple[float, bool] | None],
    ) -> None:
        dev = self.device
        lengths = torch.tensor([len(c) for c in batch], device=dev)  # (B,)
        width = int(lengths.max())
        ids = torch.zeros(len(batch), width, dtype=torch.long, device=dev)  # right-padded, as HFLM pads
        for j, ctx in enumerate(batch):
            ids[j, : len(ctx)] = torch.tensor(ctx, dtype=torch.long)
        # No attention mask: padding sits after each context, where causal attention cannot see it.
        # Only each context's last position is projected onto the vocabulary.
        last = torch.unique(lengths - 1)  # sorted
        head = self._forward(input_ids=ids, use_cache=True, logits_to_keep=last)
        first = F.log_softmax(head.logits, dim=-1, dtype=self.softmax_dtype)  # (B, len(last), V)
        first = first[torch.arange(len(batch), device=dev), torch.searchsorted(last, lengths - 1)]  # (B, V)
        cache = head.past_key_values

        rows = [(j, i) for j, ctx in enumerate(batch) for i in groups[ctx]]  # (context slot, request)
        step = self.batch_size * _CONT_ROWS_PER_CONTEXT
        for start in range(0, len(rows), step):
            part = rows[start : start + step]
            conts = [requests[i][2] for _, i in part]
            slots = torch.tensor([j for j, _ in part], device=dev)  # (R,)
            tail_len = max(len(c) for c in conts) - 1
            tail = None
            if tail_len > 0:  # every continuation but its last token, right-padded
                inp = torch.zeros(len(part), tail_len, dtype=torch.long, device=dev)
                for r, cont in enumerate(conts):
                    inp[r, : len(cont) - 1] = torch.tensor(cont[:-1], dtype=torch.long)
                # Keys: the context (its padding masked: a shorter context's pad sits before its
                # continuation), then the continuation; positions carry on from each context's end.
                keys = torch.arange(width + tail_len, device=dev)
                mask = (keys[None, :] < lengths[slots, None]) | (keys[None, :] >= width)
                positions = lengths[slots, None] + torch.arange(tail_len, device=dev)[None, :]
                logits = self._forward(
                    input_ids=inp,
                    past_key_values=self._copy_rows(cache, slots),
                    attention_mask=mask.long(),
                    position_ids=positions,
                    use_cache=True,
                ).logits
                tail = F.log_softmax(logits, dim=-1, dtype=self.softmax_dtype)  # (R, tail_len, V)
            for r, ((j, i), cont) in enumerate(zip(part, conts, strict=True)):
                scored = first[j][None] if tail is None else torch.cat([first[j][None], tail[r, : len(cont) - 1]])
                target = torch.tensor(cont, dtype=torch.long, device=dev)
                greedy = bool((scored.argmax(dim=-1) == target).all())
                answer = (float(scored.gather(1, target[:, None]).sum()), greedy)
                out[i] = answer
                request_str = requests[i][0]
                if request_str is not None:
                    self.cache_hook.add_partial("loglikelihood", request_str, answer)
