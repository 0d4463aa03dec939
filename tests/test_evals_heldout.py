"""Held-out loss against an independent one-sequence-at-a-time computation on a tiny real model."""

from __future__ import annotations

import functools
import json
import math
import statistics
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from analysis.evals.heldout import heldout_loss, load_probe_set, ratio_df, ratio_interval, ratio_stderr
from analysis.models import build_word_tokenizer, tiny_moe_config

WORDS = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "to", "park", "and", "big", "small", "red", "blue"]


@pytest.fixture(scope="module")
def tokenizer():
    return build_word_tokenizer(WORDS)


@pytest.fixture(scope="module")
def model(tokenizer, device):
    """A tiny OLMoE on the device under test: heldout_loss computes where the model is."""
    from transformers import OlmoeForCausalLM

    torch.manual_seed(0)
    config = tiny_moe_config(len(tokenizer), hidden_size=32, num_heads=2, num_experts=4, top_k=2)
    return OlmoeForCausalLM(config).eval().to(device)


TEXTS = [
    "the cat sat on a mat",
    "the dog ran to the park and the cat sat",
    "big red dog",
    "a small blue cat ran to a big red mat and sat on the mat",
    "the mat",
]


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _manual(model, seqs):
    """Token-weighted NLL and per-sequence means, one sequence per forward pass, no padding."""
    total, tokens, means = 0.0, 0, []
    with torch.no_grad():
        for seq in seqs:
            ids = torch.tensor([seq], device=model.device)
            logits = model(input_ids=ids).logits[0].float()
            nll = F.cross_entropy(logits[:-1], ids[0, 1:], reduction="sum").item()
            total += nll
            tokens += len(seq) - 1
            means.append(nll / (len(seq) - 1))
    return total, tokens, means


def test_loss_equals_manual_loop(tmp_path, model, tokenizer):
    probe = _write_jsonl(tmp_path / "web.jsonl", [{"text": t} for t in TEXTS])
    probe_set = load_probe_set(probe, tokenizer, max_length=32)
    result = heldout_loss(model, probe_set, batch_size=4)["web"]

    seqs = [tokenizer(t)["input_ids"] for t in TEXTS]
    total, tokens, means = _manual(model, seqs)
    assert result.n_samples == len(TEXTS)
    assert result.n_tokens == tokens
    assert result.mean_nll == pytest.approx(total / tokens, abs=1e-5)
    assert result.perplexity == pytest.approx(math.exp(total / tokens), rel=1e-5)
    # Ratio-estimator stderr, sequences as units: sums S_i = mean_i * T_i, counts T_i.
    counts = np.array([len(s) - 1 for s in seqs], dtype=float)
    sums = np.array(means) * counts
    resid = sums - total / tokens * counts
    leverage = counts / counts.sum()
    assert result.stderr == pytest.approx(math.sqrt((resid**2 / (1 - leverage)).sum()) / counts.sum(), rel=1e-4)
    n = len(seqs)
    assert result.stderr != pytest.approx(statistics.stdev(means) / math.sqrt(n), rel=1e-2)  # lengths differ
    assert result.per_sample_nll == pytest.approx(means, abs=1e-5)
    # The word tokenizer decodes to the words joined by single spaces: the original texts here.
    n_bytes = sum(len(t.encode()) for t in TEXTS)
    assert result.bits_per_byte == pytest.approx(total / math.log(2) / n_bytes, rel=1e-5)


def test_padding_does_not_change_the_result(tmp_path, model, tokenizer):
    probe = _write_jsonl(tmp_path / "web.jsonl", [{"text": t} for t in TEXTS])
    probe_set = load_probe_set(probe, tokenizer, max_length=32)
    one = heldout_loss(model, probe_set, batch_size=1)["web"]
    four = heldout_loss(model, probe_set, batch_size=4)["web"]
    assert four.mean_nll == pytest.approx(one.mean_nll, abs=1e-5)
    assert four.per_sample_nll == pytest.approx(one.per_sample_nll, abs=1e-5)
    assert four.n_tokens == one.n_tokens


def test_folder_of_domains_txt_and_input_ids(tmp_path, model, tokenizer):
    folder = tmp_path / "probes"
    folder.mkdir()
    (folder / "stories.txt").write_text("the cat sat on a mat\n\nthe dog ran to the park\n")
    ids = [[1, 5, 6, 7, 8], [1, 9, 10, 11]]
    _write_jsonl(folder / "tokens.jsonl", [{"input_ids": s} for s in ids])
    (folder / "notes.md").write_text("not a probe file")
    probe_set = load_probe_set(folder, tokenizer, max_length=4, max_samples=5)
    assert sorted(probe_set.domains) == ["stories", "tokens"]
    assert len(probe_set.domains["stories"]) == 2  # the blank line is not a document
    assert all(len(s) <= 4 for seqs in probe_set.domains.values() for s in seqs)  # truncated
    results = heldout_loss(model, probe_set, batch_size=3)
    assert results["tokens"].bits_per_byte is None
    assert results["stories"].bits_per_byte is not None
    total, tokens, _ = _manual(model, [s[:4] for s in ids])
    assert results["tokens"].mean_nll == pytest.approx(total / tokens, abs=1e-5)


def test_fingerprint_tracks_tokens_and_vocab(tmp_path, tokenizer):
    probe = _write_jsonl(tmp_path / "web.jsonl", [{"text": t} for t in TEXTS])
    first = load_probe_set(probe, tokenizer, max_length=32)
    assert load_probe_set(probe, tokenizer, max_length=32).fingerprint == first.fingerprint
    assert load_probe_set(probe, tokenizer, max_length=5).fingerprint != first.fingerprint
    other_vocab = build_word_tokenizer([*WORDS, "extra"])
    assert load_probe_set(probe, other_vocab, max_length=32).fingerprint != first.fingerprint


def test_model_mode_is_restored(tmp_path, model, tokenizer):
    probe = _write_jsonl(tmp_path / "web.jsonl", [{"text": t} for t in TEXTS[:2]])
    model.train()
    try:
        heldout_loss(model, load_probe_set(probe, tokenizer, max_length=32))
        assert model.training
    finally:
        model.eval()


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.jsonl", "", r"empty\.jsonl: empty"),
        ("bad.jsonl", '{"text": "the cat"}\n{"text": \n', r"bad\.jsonl:2: not valid JSON"),
        ("nofield.jsonl", '{"text": "the cat"}\n{"body": "x"}\n', r'nofield\.jsonl:2: no "text" or "input_ids"'),
        ("ids.jsonl", '{"input_ids": [1, "two"]}\n', r'ids\.jsonl:1: "input_ids" must be a list'),
        ("short.jsonl", '{"input_ids": [1]}\n', r"short\.jsonl: no sample has 2 or more tokens"),
    ],
)
def test_bad_input_gives_one_line_errors(tmp_path, tokenizer, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as err:
        load_probe_set(path, tokenizer, max_length=16)
    assert "\n" not in str(err.value)


def test_missing_path_and_empty_folder(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="not found"):
        load_probe_set(tmp_path / "nope.jsonl", tokenizer, max_length=16)
    with pytest.raises(ValueError, match=r"no \.jsonl or \.txt probe files"):
        load_probe_set(tmp_path, tokenizer, max_length=16)


# A population of sequences with mixed lengths and a per-sequence random effect (a document is
# easy or hard as a whole), longer documents a little easier: token NLLs of sequence i are
# MU + SLOPE * log2(T_i / 64) + u_i + noise, u_i ~ N(0, SIGMA_SEQ^2), noise ~ N(0, SIGMA_TOKEN^2).
LENGTHS = np.array([16, 32, 64, 128])  # equally likely
MU, SLOPE, SIGMA_SEQ, SIGMA_TOKEN = 3.0, -0.1, 0.5, 1.0
REPLICATIONS = 10_000  # Monte-Carlo stderr of a 95% coverage: sqrt(0.95 * 0.05 / 10_000) = 0.0022


def _population_loss() -> float:
    """The token-weighted loss of the whole population: E[S] / E[T]."""
    effect = MU + SLOPE * np.log2(LENGTHS / 64)
    return float((LENGTHS * effect).sum() / LENGTHS.sum())


@functools.cache
def _draws(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-sequence NLL sums and token counts, (REPLICATIONS, n) each: every interval sees the same data."""
    rng = np.random.default_rng(n)
    counts = rng.choice(LENGTHS, size=(REPLICATIONS, n)).astype(float)
    per_token = MU + SLOPE * np.log2(counts / 64) + SIGMA_SEQ * rng.standard_normal((REPLICATIONS, n))
    sums = counts * per_token + SIGMA_TOKEN * np.sqrt(counts) * rng.standard_normal((REPLICATIONS, n))
    return sums, counts


def _coverage(n: int, interval) -> float:
    truth = _population_loss()
    sums, counts = _draws(n)
    hits = 0
    for row in range(REPLICATIONS):
        lo, hi = interval(sums[row], counts[row])
        hits += lo <= truth <= hi
    return hits / REPLICATIONS


@pytest.mark.parametrize("n", [8, 32, 256])
@pytest.mark.slow
def test_ratio_interval_covers_the_population_loss_at_the_nominal_rate(n):
    # 93-97%: the nominal 95% +- 9 Monte-Carlo stderrs (0.0022); measured 0.942, 0.944, 0.949.
    assert 0.93 <= _coverage(n, ratio_interval) <= 0.97


@pytest.mark.parametrize("n", [8, 32, 256])
@pytest.mark.slow
def test_per_sequence_mean_stderr_undercovers_on_the_same_data(n):
    def old(sums, counts):
        ratio = sums.sum() / counts.sum()
        half = 1.96 * statistics.stdev(sums / counts) / math.sqrt(len(sums))
        return ratio - half, ratio + half

    assert _coverage(n, old) < 0.92


def test_normal_quantile_undercovers_with_few_sequences_so_the_interval_uses_t():
    def normal(sums, counts):
        half = 1.96 * ratio_stderr(sums, counts)
        return sums.sum() / counts.sum() - half, sums.sum() / counts.sum() + half

    assert _coverage(8, normal) < 0.92 < _coverage(8, ratio_interval)


def test_ratio_stderr_is_the_mean_stderr_for_equal_lengths_and_checks_input():
    rng = np.random.default_rng(0)
    means = rng.normal(3.0, 0.5, size=10)
    counts = np.full(10, 20.0)
    assert ratio_stderr(means * counts, counts) == pytest.approx(statistics.stdev(means) / math.sqrt(10), rel=1e-12)
    assert ratio_df(counts) == pytest.approx(9.0)
    assert ratio_df([100.0, 1.0, 1.0, 1.0]) < 1.1  # one sequence carries the tokens: few degrees of freedom
    # By hand: R = 4/4 = 1, residuals (1, -1), leverages (1/4, 3/4): var = (1/0.75 + 1/0.25) / 16 = 1/3.
    # (The textbook n/(n-1) form would give 0.5, the per-sequence-mean form sqrt(0.5).)
    assert ratio_stderr([2.0, 2.0], [1.0, 3.0]) == pytest.approx(1 / math.sqrt(3), rel=1e-12)
    with pytest.raises(ValueError, match="at least 2"):
        ratio_stderr([1.0], [2.0])
    with pytest.raises(ValueError, match="at least 2"):
        ratio_stderr([1.0, 0.0], [2.0, 0.0])
    with pytest.raises(ValueError, match="3 sums but 2 counts"):
        ratio_stderr([1.0, 2.0, 3.0], [1.0, 2.0])


# --- bits per byte does not depend on whether the tokenizer adds BOS ----------------------------


def _word_tokenizer(*, adds_bos: bool, bos: bool = True, eos: bool = True):
    """build_word_tokenizer's vocabulary and decoder, with or without BOS added / BOS and EOS defined."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from analysis.models import BOS, EOS, PAD, UNK

    vocab = {tok: i for i, tok in enumerate([PAD, BOS, EOS, UNK, *WORDS])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if adds_bos:
        core.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, vocab[BOS])])
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    specials = {"bos_token": BOS if bos else None, "eos_token": EOS if eos else None}
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, unk_token=UNK, **specials)


class _Uniform(torch.nn.Module):
    """A causal LM whose next-token distribution is uniform over its vocabulary: NLL = ln V per token."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab_size)
        self.logits = torch.nn.Parameter(torch.zeros(vocab_size))

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.logits.expand(*input_ids.shape, -1))


@pytest.mark.parametrize("max_length", [32, 4])
@pytest.mark.parametrize(
    ("kind", "adds_bos", "bos", "eos"),
    [("adds BOS", True, True, True), ("BOS not added", False, True, True), ("EOS only", False, False, True)],
)
def test_uniform_model_bits_per_byte_is_log2_v_per_byte_of_every_text_token(
    tmp_path, kind, adds_bos, bos, eos, max_length
):
    tok = _word_tokenizer(adds_bos=adds_bos, bos=bos, eos=eos)
    probe = _write_jsonl(tmp_path / "web.jsonl", [{"text": t} for t in TEXTS])
    result = heldout_loss(_Uniform(len(tok)), load_probe_set(probe, tok, max_length=max_length))["web"]
    kept = [t.split()[: max_length - 1] for t in TEXTS]  # a prefix or BOS takes the first position
    tokens = sum(len(words) for words in kept)
    n_bytes = sum(len(" ".join(words).encode()) for words in kept)
    assert result.n_tokens == tokens, kind
    assert result.mean_nll == pytest.approx(math.log(len(tok)), rel=1e-6)
    assert result.bits_per_byte == pytest.approx(math.log2(len(tok)) * tokens / n_bytes, rel=1e-6)


def test_bits_per_byte_agrees_across_tokenizers_on_the_same_text(tmp_path):
    probe = _write_jsonl(tmp_path / "web.jsonl", [{"text": t} for t in TEXTS])
    with_bos, without = _word_tokenizer(adds_bos=True), _word_tokenizer(adds_bos=False, bos=False)
    model = _Uniform(len(with_bos))
    a = heldout_loss(model, load_probe_set(probe, with_bos, max_length=32))["web"]
    b = heldout_loss(model, load_probe_set(probe, without, max_length=32))["web"]
    assert a.bits_per_byte == pytest.approx(b.bits_per_byte, rel=1e-9)
    assert a.n_tokens == b.n_tokens and a.bits_per_byte_stderr == pytest.approx(b.bits_per_byte_stderr, rel=1e-9)


def test_a_tokenizer_with_neither_bos_nor_eos_leaves_out_the_first_tokens_bytes(tmp_path):
    tok = _word_tokenizer(adds_bos=False, bos=False, eos=False)
    probe = _write_jsonl(tmp_path / "web.jsonl", [{"text": t} for t in TEXTS])
    result = heldout_loss(_Uniform(len(tok)), load_probe_set(probe, tok, max_length=32))["web"]
    tokens = sum(len(t.split()) - 1 for t in TEXTS)
    n_bytes = sum(len(" ".join(t.split()[1:]).encode()) for t in TEXTS)  # the first word is never scored
    assert result.n_tokens == tokens
    assert result.bits_per_byte == pytest.approx(math.log2(len(tok)) * tokens / n_bytes, rel=1e-6)


@pytest.mark.slow
def test_text_without_bos_is_scored_from_the_eos_prefix(tmp_path, model, tokenizer):
    tok = _word_tokenizer(adds_bos=False, bos=False)
    probe = _write_jsonl(tmp_path / "web.jsonl", [{"text": t} for t in TEXTS])
    probe_set = load_probe_set(probe, tok, max_length=32)
    result = heldout_loss(model, probe_set, batch_size=2)["web"]
    eos = tok.eos_token_id
    total, tokens, _ = _manual(model, [[eos, *tok(t)["input_ids"]] for t in TEXTS])
    assert result.mean_nll == pytest.approx(total / tokens, abs=1e-5)
    assert probe_set.domains["web"][0] == tuple(tok(TEXTS[0])["input_ids"])  # metrics see the text's own tokens
