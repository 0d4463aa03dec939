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


def has_tokenizer_files(folder: str | Path) -> bool:
    """Whether a checkpoint folder holds tokenizer files (raw training checkpoints often do not)."""
    folder = Path(folder)
    return folder.is_dir() and any(p.name.startswith(TOKENIZER_FILES) for p in folder.iterdir())


def load_tokenizer(folder: str | Path, *, trust_remote_code: bool = False, needed_for: str = ""):
    """The tokenizer saved in a checkpoint folder; one-line ValueError naming the folder when there is none.

    ``needed_for`` says in the error what wanted it (e.g. "the text samples of probe.jsonl").
    """
    from transformers import AutoTokenizer

    folder = Path(folder)
    if not has_tokenizer_files(folder):
        # Without these, AutoTokenizer may build some other tokenizer and every text would be misread.
        why = f" to tokenise {needed_for}" if needed_for else ""
        raise ValueError(
            f"{folder}: no tokenizer files (tokenizer.json, tokenizer_config.json, ...){why}; "
            "save the tokenizer there with tokenizer.save_pretrained"
        )
    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{folder}: cannot load the tokenizer ({first}); save it again with save_pretrained") from None


class LazyTokenizer:
    """A checkpoint's tokenizer, loaded on first :meth:`get`: a folder without tokenizer files
    fails only when something needs one (text probe samples, lm-eval, proxy metrics)."""

    def __init__(self, folder: str | Path, *, trust_remote_code: bool = False) -> None:
        self.folder = Path(folder)
        self.trust_remote_code = trust_remote_code
        self._loaded = None

    @property
    def available(self) -> bool:
        """Whether there are tokenizer files to load (loads nothing)."""
        return self._loaded is not None or has_tokenizer_files(self.folder)

    @property
    def loaded(self):
        """The tokenizer if something already loaded it, else None (loads nothing)."""
        return self._loaded

    def get(self, needed_for: str = ""):
        """The tokenizer, loaded once; ValueError naming the folder when it has none."""
        if self._loaded is None:
            self._loaded = load_tokenizer(self.folder, trust_remote_code=self.trust_remote_code, needed_for=needed_for)
        return self._loaded


def resolve_tokenizer(tokenizer, needed_for: str = ""):
    """A tokenizer from a tokenizer, a :class:`LazyTokenizer` (loaded now) or None (kept None)."""
    return tokenizer.get(needed_for) if isinstance(tokenizer, LazyTokenizer) else tokenizer


def pad_token_id(model: torch.nn.Module) -> int:
    """The id that pads a batch of this model's inputs: config pad_token_id, else eos_token_id, else 0.

    Padding positions are masked out of attention and of the loss, so the id only has to be
    one the embedding accepts; the config's own keeps batches like those the model was made for.
    """
    config = getattr(model, "config", None)
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(config, name, None)
        if isinstance(value, list | tuple):  # some configs list several EOS ids
            value = value[0] if value else None
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return 0


def _mismatch(records: list) -> str | None:
    """The first size-mismatch row of a transformers load report, as "name: checkpoint [..] vs config [..]"."""
    import re

    for record in records:
        for line in re.sub(r"\x1b\[[0-9;]*m", "", record.getMessage()).splitlines():
            found = re.search(
                r"^\s*(.+?)\s*\|\s*MISMATCH.*ckpt: torch.Size\((\[[^]]*])\) vs model:\s*torch.Size\((\[[^]]*])\)", line
            )
            if found:
                return f"{found[1]}: {found[2]} in the weights, {found[3]} from config.json"
    return None


def load_model(
    folder: str | Path,
    *,
    device: str | torch.device | None = "auto",
    dtype: torch.dtype | str | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    experts_implementation: str | None = None,
    lazy_tokenizer: bool = False,
):
    """Load a transformers causal LM and its tokenizer from a local checkpoint folder.

    Returns ``(model, tokenizer)`` with the model in eval mode on ``device``. ``dtype``
    None keeps the checkpoint's own dtype. Raises ValueError with a one-line message for a
    missing or corrupt checkpoint, and for one whose config.json does not fit its weights.
    With ``lazy_tokenizer`` the tokenizer is a :class:`LazyTokenizer` that loads (or fails,
    for a folder without tokenizer files) only when something asks for it; otherwise a
    folder without tokenizer files is an error here.
    """
    import logging

    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

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
    tokenizer = LazyTokenizer(folder, trust_remote_code=trust_remote_code)
    if not lazy_tokenizer:
        tokenizer = tokenizer.get()
    kwargs: dict = {"trust_remote_code": trust_remote_code, "dtype": dtype if dtype is not None else "auto"}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if experts_implementation:
        kwargs["experts_implementation"] = experts_implementation
    # transformers' own loading bar and load report would land on stderr between our lines:
    # hold the report back, name its first mismatch in the error, and replay it on success.
    hf_logging.disable_progress_bar()
    held: list[logging.LogRecord] = []
    catcher = logging.Handler(logging.WARNING)
    catcher.emit = held.append  # type: ignore[method-assign]
    hf_logging.disable_default_handler()
    hf_logging.add_handler(catcher)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as err:
        mismatch = _mismatch(held)
        if mismatch:
            raise ValueError(
                f"{folder}: config.json does not fit the weights ({mismatch}); "
                "put back the config.json saved with these weights"
            ) from None
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{folder}: cannot load checkpoint ({first})") from None
    finally:
        hf_logging.remove_handler(catcher)
        hf_logging.enable_default_handler()
    for record in held:  # warnings of a load that worked (missing or unexpected weights) still show
        logging.getLogger(record.name).handle(record)
    model.to(pick_device(device))
    model.eval()
    return model, tokenizer
