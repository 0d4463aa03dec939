"""Loading checkpoints safely, and building the tiny models and tokenizers the demo and tests use.

Loading never executes code from a checkpoint: weights come from safetensors, or from a
``.bin`` through ``torch.load(weights_only=True)`` (what transformers does by default), and
``trust_remote_code`` is off unless the caller switches it on for that run.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from analysis.runs.base import check_not_lfs_pointer
from analysis.runs.local import check_weights_only, is_weightless

# A checkpoint folder holds its tokenizer in files named like these.
TOKENIZER_FILES = ("tokenizer", "vocab", "merges", "spiece", "sentencepiece")

# Special tokens of the word-level tokenizers built here.
PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"


def pick_device(device: str | torch.device | None = "auto") -> torch.device:
    """Resolve ``"auto"`` to cuda, then mps, then cpu; pass anything else through."""
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


def build_word_tokenizer(words: list[str]):
    """A whitespace-split word-level tokenizer that adds BOS to every encoding.

    Built offline with the ``tokenizers`` library. lm-eval only adds BOS through the
    tokenizer's own special-token handling, so the post-processor matters: a model
    trained with BOS scores near chance when evaluated without it.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([PAD, BOS, EOS, UNK, *words])}
    if len(vocab) != len(words) + 4:
        raise ValueError("build_word_tokenizer: words must be unique and must not be special tokens")
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    # Decoding joins words with spaces, so generated text reads like the prompts.
    from tokenizers import decoders

    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        padding_side="left",
    )


def tiny_moe_config(
    vocab_size: int,
    *,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_experts: int = 4,
    top_k: int = 2,
    num_heads: int = 4,
    max_positions: int = 64,
    pad_token_id: int = 0,
    bos_token_id: int = 1,
    eos_token_id: int = 2,
):
    """An OLMoE config small enough to train on a CPU in seconds (about 0.5M parameters)."""
    from transformers import OlmoeConfig

    return OlmoeConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        num_experts=num_experts,
        num_experts_per_tok=top_k,
        max_position_embeddings=max_positions,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        tie_word_embeddings=False,
    )


def read_config(folder: str | Path) -> dict:
    """Read a checkpoint's config.json, with a one-line error naming the file and the fix."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ValueError(f"{path}: missing; a checkpoint folder needs the config.json that save_pretrained writes")
    check_not_lfs_pointer(path)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err}); re-save the checkpoint with save_pretrained") from None


def load_model(
    folder: str | Path,
    *,
    device: str | torch.device | None = "auto",
    dtype: torch.dtype | str | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    experts_implementation: str | None = None,
):
    """Load a transformers causal LM and its tokenizer from a local checkpoint folder.

    Returns ``(model, tokenizer)`` with the model in eval mode on ``device``. ``dtype``
    None keeps the checkpoint's own dtype. Raises ValueError with a one-line message for a
    missing or corrupt checkpoint.
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    if folder.is_dir() and is_weightless(folder):
        raise ValueError(
            f"{folder}: no weights here, only trainer_state.json; download the weights into it and run add-run again"
        )
    read_config(folder)  # fail early and clearly on a missing or broken config.json
    # Not every .bin is weights: Trainer checkpoints also hold training_args.bin.
    weights = [*folder.glob("*.safetensors"), *folder.glob("pytorch_model*.bin"), *folder.glob("model*.bin")]
    if not weights:
        raise ValueError(f"{folder}: no *.safetensors or *.bin weights; save the checkpoint with save_pretrained")
    for file in weights:
        check_not_lfs_pointer(file)  # else transformers fails on it with a message about headers
        if file.name.endswith(".bin"):
            check_weights_only(file)  # refuse pickled code before transformers opens the file
    if not any(p.name.startswith(TOKENIZER_FILES) for p in folder.iterdir()):
        # Without these, AutoTokenizer may build some other tokenizer and every text would be misread.
        raise ValueError(
            f"{folder}: no tokenizer files (tokenizer.json, tokenizer_config.json, ...); "
            "save the tokenizer there with tokenizer.save_pretrained"
        )
    kwargs: dict = {"trust_remote_code": trust_remote_code, "dtype": dtype if dtype is not None else "auto"}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if experts_implementation:
        kwargs["experts_implementation"] = experts_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{folder}: cannot load checkpoint ({first})") from None
    model.to(pick_device(device))
    model.eval()
    return model, tokenizer
