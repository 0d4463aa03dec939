"""Held-out loss per data domain: mean token NLL, its standard error, perplexity and bits per byte.

Probe data (one domain per file; a folder of files gives one domain per file, named by the
file's stem):

- ``.jsonl``: one sample per line, a JSON object with ``text`` (tokenised with the checkpoint's
  tokenizer, special tokens included, so a BOS-adding tokenizer adds BOS) or ``input_ids``.
  ``input_ids`` need no tokenizer: a checkpoint without tokenizer files (raw training
  checkpoints often have none) is scored on them as well, and its tokenizer, when passed as a
  :class:`analysis.models.LazyTokenizer`, is loaded only once a text sample needs it.
- ``.txt``: one document per non-empty line. Per line rather than the whole file, so a domain
  has many samples (a standard error) and ``max_samples`` means the same for both formats.

Sequences are cut to their first ``max_length`` tokens; sequences under 2 tokens predict
nothing and are dropped (counted in ``ProbeSet.dropped``).

Every token of a text sample is scored, whatever the tokenizer. A tokenizer that puts BOS in
front (Llama, the project's word tokenizers) already gives the first text token something to
be predicted from. One that adds nothing (GPT-2, Pythia, OLMo) would leave the first token
unscored while its bytes still counted, so bits per byte would depend on the tokenizer (lower
without BOS, by the first token's share of the bytes). So the held-out loss scores such a sample
with the tokenizer's BOS id in front, or its EOS id when it has no BOS (GPT-2 style; lm-eval's
rolling log-likelihood does the same): ``ProbeSet.scored``. Bits per byte counts exactly the
bytes of the scored tokens (the decoded sequence after its first position), so a model whose
next token is uniform over V gets log2(V) * scored tokens / their bytes with either kind of
tokenizer. A tokenizer with neither BOS nor EOS leaves the first token unscored and its bytes
uncounted. ``input_ids`` samples are scored as given. The internal metrics take
``ProbeSet.domains``: the sequences as tokenised, without the prefix.

The loss of a domain is token-weighted: total NLL over every predicted token (labels = inputs
shifted by one, padding ignored) divided by the number of those tokens, a ratio of two sums
over sequences. Tokens of one sequence are not independent (a document is easy or hard as a
whole), so the sequence is the sampling unit and the standard error is the ratio estimator's
(delta method, :func:`ratio_stderr`). The standard deviation of per-sequence means over
sqrt(n) is not it: it weights a 4-token and a 400-token sequence alike, and undercovers when
lengths vary (tests/test_evals_heldout.py measures both). Bits per byte = total NLL (nats) /
ln 2 / total UTF-8 bytes of the scored tokens, also a ratio of sums, with its stderr from the
same function; None for ``input_ids`` data (no text to count bytes of).

Batches are right-padded with the model's pad id (:func:`analysis.models.pad_token_id`: config
``pad_token_id``, else ``eos_token_id``, else 0) under an attention mask; padded positions are
neither attended to nor scored, so a sequence's loss does not depend on what it is batched with.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from analysis.models import LazyTokenizer, pad_token_id, pick_device, resolve_tokenizer

_SUFFIXES = (".jsonl", ".txt")


@dataclass(frozen=True)
class ProbeSet:
    """Tokenised probe samples per domain, with a fingerprint of exactly what will be scored."""

    domains: dict[str, tuple[tuple[int, ...], ...]]  # domain -> sequences of token ids, as tokenised
    n_bytes: dict[str, tuple[int, ...] | None]  # domain -> UTF-8 bytes of each sequence's scored tokens
    fingerprint: str  # sha256 of the token ids and the tokenizer's vocabulary
    max_length: int
    dropped: dict[str, int]  # domain -> sequences under 2 tokens, left out
    # domain -> the same sequences as the held-out loss scores them (score_prefix in front of text
    # whose tokenizer adds no BOS); absent: scored as in ``domains``
    scored: dict[str, tuple[tuple[int, ...], ...]] = field(default_factory=dict)

    @property
    def n_samples(self) -> int:
        return sum(len(seqs) for seqs in self.domains.values())


@dataclass(frozen=True)
class LossResult:
    """Held-out loss of one domain (nats per predicted token)."""

    mean_nll: float  # token-weighted mean NLL
    stderr: float | None  # ratio-estimator stderr over sequences (ratio_stderr); None for one sample
    perplexity: float
    bits_per_byte: float | None
    n_tokens: int  # predicted tokens
    n_samples: int
    per_sample_nll: tuple[float, ...] = ()  # mean NLL of each sequence, in probe order
    bits_per_byte_stderr: float | None = None  # ratio_stderr of NLL bits over bytes
    df: float | None = None  # degrees of freedom for a t interval (ratio_df)


def ratio_stderr(sums: Sequence[float], counts: Sequence[float]) -> float:
    """Standard error of R = sum(sums) / sum(counts), each (sum, count) pair one sampled unit.

    The ratio estimator of survey sampling (delta method): var(R) ~ sum_i (S_i - R T_i)^2 /
    (1 - h_i) / (sum T)^2, with h_i = T_i / sum T the leverage of unit i in R. For equal T_i
    every h_i is 1/n and this is n/(n-1) * sum (S_i - R T_i)^2 / (sum T)^2, the textbook form
    and the usual stderr of a mean. Dividing by 1 - h_i instead of (n-1)/n matters when a few
    long sequences carry most tokens: their residuals are pulled towards 0 by their own weight
    in R, and the textbook form then undercovers (simulated true coverage of the t interval
    below at n = 8, lengths 16-128: 0.936 textbook, 0.942 here; equal from n = 256 on).

    With per-sequence NLL sums S_i and token counts T_i this is the stderr of the
    token-weighted loss; with bits and bytes, of bits per byte. For a 95% interval use
    R +- t * stderr with t the Student quantile at :func:`ratio_df` degrees of freedom
    (:func:`ratio_interval`): with few sequences of mixed lengths the normal quantile
    undercovers (0.87 at n = 8 in the same simulation).
    """
    n = len(sums)
    if n != len(counts):
        raise ValueError(f"ratio_stderr: {n} sums but {len(counts)} counts; pass one of each per sequence")
    if sum(1 for c in counts if c > 0) < 2:
        raise ValueError("ratio_stderr: needs at least 2 sequences with a positive count (one gives no spread)")
    total = math.fsum(counts)
    ratio = math.fsum(sums) / total
    spread = math.fsum((s - ratio * c) ** 2 / (1.0 - c / total) for s, c in zip(sums, counts, strict=True))
    return math.sqrt(spread) / total


def ratio_df(counts: Sequence[float]) -> float:
    """Degrees of freedom for the t quantile of a ratio: Kish's effective sample size minus 1.

    n_eff = (sum T)^2 / sum T^2 is n for equal lengths and less when a few long sequences
    carry most of the tokens, which is when the variance estimate itself is least certain.
    """
    total = math.fsum(counts)
    return max(total * total / math.fsum(c * c for c in counts) - 1.0, 1.0)


def ratio_interval(sums: Sequence[float], counts: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """Two-sided ``level`` interval for sum(sums)/sum(counts): R +- t(ratio_df) * ratio_stderr."""
    from scipy.stats import t

    ratio = math.fsum(sums) / math.fsum(counts)
    half = float(t.ppf(0.5 + level / 2, ratio_df(counts))) * ratio_stderr(sums, counts)
    return ratio - half, ratio + half


def _vocab_hash(tokenizer: Any) -> str:
    if tokenizer is None:
        return "no-tokenizer"
    vocab = tokenizer.get_vocab()
    return hashlib.sha256(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode()).hexdigest()


def _probe_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in _SUFFIXES)
        if not files:
            raise ValueError(f"{path}: no .jsonl or .txt probe files in this folder; add one file per domain")
        return files
    raise ValueError(f"{path}: not found; pass a probe file (.jsonl / .txt) or a folder of them")


def _read_samples(path: Path) -> list[tuple[str | None, list[int] | None]]:
    """(text, input_ids) per sample, one of them None; one-line errors name file, line and fix."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text; save the probe file as UTF-8") from None
    samples: list[tuple[str | None, list[int] | None]] = []
    if path.suffix == ".txt":
        samples = [(line, None) for line in lines if line.strip()]
    else:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"{path}:{number}: not valid JSON ({err.msg}); write one JSON object per line"
                ) from None
            if not isinstance(record, dict) or not ("text" in record or "input_ids" in record):
                raise ValueError(f'{path}:{number}: no "text" or "input_ids" field; give each line one of them')
            if "text" in record:
                if not isinstance(record["text"], str):
                    raise ValueError(f'{path}:{number}: "text" must be a string; quote the document text')
                samples.append((record["text"], None))
            else:
                ids = record["input_ids"]
                ok = isinstance(ids, list) and all(type(i) is int and i >= 0 for i in ids)
                if not ok:
                    raise ValueError(f'{path}:{number}: "input_ids" must be a list of non-negative integers')
                samples.append((None, ids))
    if not samples:
        raise ValueError(f"{path}: empty; a probe file needs at least one sample (one per line)")
    return samples


def score_prefix(tokenizer: Any) -> int | None:
    """The id put in front of text whose tokenizer adds no BOS, so that its first token is scored.

    lm-eval's prefix for rolling log-likelihoods: the BOS id when the tokenizer defines one
    (GPT-2 and Pythia define ``<|endoftext|>`` as both BOS and EOS without adding it), else
    the EOS id; None when it has neither.
    """
    for name in ("bos_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return None


def load_probe_set(
    path: str | Path,
    tokenizer: Any,
    max_length: int,
    max_samples: int | None = None,
) -> ProbeSet:
    """Load and tokenise probe data: one domain per file (see the module docstring for formats).

    ``max_samples`` keeps the first N samples of each domain. ``tokenizer`` may be None only
    when every sample has ``input_ids``; a :class:`analysis.models.LazyTokenizer` is loaded at
    the first text sample (a checkpoint without tokenizer files fails there, naming its folder).
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 (one token predicts the next), got {max_length}")
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples must be >= 1 or None, got {max_samples}")
    path = Path(path)
    domains: dict[str, tuple[tuple[int, ...], ...]] = {}
    scored: dict[str, tuple[tuple[int, ...], ...]] = {}
    n_bytes: dict[str, tuple[int, ...] | None] = {}
    dropped: dict[str, int] = {}
    for file in _probe_files(path):
        domain = file.stem
        if domain in domains:
            raise ValueError(f"{file}: domain '{domain}' appears twice (same name, other suffix); rename one file")
        samples = _read_samples(file)[:max_samples]
        seqs, scored_seqs, sizes = _tokenise(file, samples, tokenizer, max_length)
        domains[domain], scored[domain] = seqs, scored_seqs
        n_bytes[domain] = sizes
        dropped[domain] = len(samples) - len(seqs)
    digest = hashlib.sha256()
    digest.update(json.dumps({d: [list(s) for s in seqs] for d, seqs in domains.items()}).encode())
    if scored != domains:  # unchanged fingerprints for BOS-adding tokenizers and token-id data
        digest.update(json.dumps({d: [list(s) for s in seqs] for d, seqs in scored.items()}).encode())
    # A lazy tokenizer that no text sample needed leaves token-id data keyed on the ids alone.
    digest.update(_vocab_hash(tokenizer.loaded if isinstance(tokenizer, LazyTokenizer) else tokenizer).encode())
    return ProbeSet(
        domains=domains,
        n_bytes=n_bytes,
        fingerprint=digest.hexdigest(),
        max_length=max_length,
        dropped=dropped,
        scored=scored,
    )


def _tokenise(
    file: Path, samples: list[tuple[str | None, list[int] | None]], tokenizer: Any, max_length: int
) -> tuple[tuple[tuple[int, ...], ...], tuple[tuple[int, ...], ...], tuple[int, ...] | None]:
    """One domain's sequences as tokenised, as scored, and the bytes of each one's scored tokens.

    Bytes are None unless every kept sample is text. Samples under 2 tokens as tokenised are
    dropped from both forms, so the two stay aligned sample for sample.
    """
    seqs: list[tuple[int, ...]] = []
    scored: list[tuple[int, ...]] = []
    sizes: list[int] = []
    for text, given in samples:
        if text is None:
            ids = list(given or ())
            if len(ids) >= 2:
                seqs.append(tuple(ids[:max_length]))
                scored.append(seqs[-1])
            continue
        tokenizer = resolve_tokenizer(tokenizer, f"the text samples of {file} (or give them as input_ids)")
        if tokenizer is None:
            raise ValueError(f"{file}: text samples need a tokenizer; pass the checkpoint's tokenizer")
        ids = [int(i) for i in tokenizer(text)["input_ids"]]
        if len(ids[:max_length]) < 2:
            continue
        seqs.append(tuple(ids[:max_length]))
        scored.append(tuple(_with_prefix(ids, tokenizer)[:max_length]))
        # Bytes of what is scored: every position after the first, decoded (truncation included).
        sizes.append(len(tokenizer.decode(list(scored[-1][1:]), skip_special_tokens=True).encode("utf-8")))
    if not seqs:
        raise ValueError(f"{file}: no sample has 2 or more tokens; probe samples need text to predict")
    return tuple(seqs), tuple(scored), tuple(sizes) if len(sizes) == len(seqs) else None


def _with_prefix(ids: list[int], tokenizer: Any) -> list[int]:
    """``ids`` with score_prefix in front, unless the tokenizer already put its BOS there."""
    prefix, bos = score_prefix(tokenizer), getattr(tokenizer, "bos_token_id", None)
    if prefix is None or (bos is not None and ids[:1] == [bos]):
        return ids
    return [prefix, *ids]


def model_device(model: torch.nn.Module, device: str | torch.device | None) -> torch.device:
    """Where inputs must go: the model's own device; a different ``device`` is an error, not a move."""
    param = next(model.parameters(), None)
    here = param.device if param is not None else torch.device("cpu")
    if device is None:
        return here
    want = pick_device(device)
    if want.type != here.type or (want.index is not None and here.index is not None and want.index != here.index):
        raise ValueError(f"the model is on {here} but device={device!s} was asked; load the model on that device")
    return here


def right_pad(seqs: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id sequences to (B, T) with an attention mask; causal models ignore what follows."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = torch.tensor(list(seq), dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids, mask


def _sequence_nll(model: torch.nn.Module, seqs: Sequence[Sequence[int]], batch_size: int, device: torch.device):
    """Summed NLL (nats) and predicted-token count of each sequence, in input order."""
    pad = pad_token_id(model)
    sums = [0.0] * len(seqs)
    counts = [0] * len(seqs)
    # Longest first: similar lengths share a batch, so little compute goes to padding.
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        ids, mask = right_pad([seqs[i] for i in idx], pad)
        ids, mask = ids.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits.float()  # (B, T, V), fp32 math
        labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)  # (B, T-1), padding ignored
        nll = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="none"
        ).view(labels.shape)
        for row, i in enumerate(idx):
            sums[i] = float(nll[row].double().sum())
            counts[i] = int((labels[row] != -100).sum())
    return sums, counts


@torch.no_grad()
def heldout_loss(
    model: torch.nn.Module,
    probe_set: ProbeSet,
    *,
    batch_size: int = 16,
    device: str | torch.device | None = None,
) -> dict[str, LossResult]:
    """Held-out loss of each domain of ``probe_set`` (see the module docstring for definitions).

    Scores ``probe_set.scored``: every token of a text sample is predicted, from the tokenizer's
    BOS when it adds one, else from its BOS or EOS id put in front (score_prefix). Bits per byte
    divides by the bytes of exactly those scored tokens, so it does not depend on whether the
    tokenizer adds BOS. The model is put in eval mode for the pass and handed back in the mode
    it came in.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    where = model_device(model, device)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    was_training = model.training
    model.eval()
    try:
        out: dict[str, LossResult] = {}
        for domain, tokenised in probe_set.domains.items():
            seqs = probe_set.scored.get(domain, tokenised)
            top = max(max(s) for s in seqs)
            if vocab is not None and top >= vocab:
                raise ValueError(
                    f"probe domain '{domain}': token id {top} >= model vocab size {vocab}; "
                    "tokenise the probe data with this checkpoint's tokenizer"
                )
            sums, counts = _sequence_nll(model, seqs, batch_size, where)
            out[domain] = _domain_result(sums, counts, probe_set.n_bytes.get(domain))
        return out
    finally:
        model.train(was_training)


def _domain_result(sums: list[float], counts: list[int], sizes: tuple[int, ...] | None) -> LossResult:
    """One domain's loss, bits per byte and their ratio stderrs from per-sequence NLL sums (nats)."""
    total, n_tokens = math.fsum(sums), sum(counts)
    mean = total / n_tokens
    several = len(sums) > 1
    bpb = bpb_stderr = None
    if sizes and sum(sizes) > 0:
        bits = [s / math.log(2) for s in sums]
        bpb = math.fsum(bits) / sum(sizes)
        bpb_stderr = ratio_stderr(bits, sizes) if sum(1 for b in sizes if b > 0) > 1 else None
    return LossResult(
        mean_nll=mean,
        stderr=ratio_stderr(sums, counts) if several else None,
        perplexity=math.exp(mean),
        bits_per_byte=bpb,
        n_tokens=n_tokens,
        n_samples=len(sums),
        per_sample_nll=tuple(s / c for s, c in zip(sums, counts, strict=True)),
        bits_per_byte_stderr=bpb_stderr,
        df=ratio_df(counts) if several else None,
    )
