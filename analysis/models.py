"""Loading checkpoints safely, and building the tiny models and tokenizers the demo and tests use.

Loading never executes code from a checkpoint: weights come from safetensors, or from a
``.bin`` through ``torch.load(weights_only=True)`` (what transformers does by default), and
``trust_remote_code`` is off unless the caller switches it on for that run.
"""

from __future__ import annotations

import json
import logging
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


# --- the dtype a checkpoint is computed in --------------------------------------------------------

# dtype names a request may give (--dtype, JobSpec.dtype), and what safetensors headers call them.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}

# What a computation does with the model. "forward": forward passes only (lm-eval, held-out loss,
# proxies, pathways, the fine-tune probe's scoring). "gradient": gradients or second derivatives
# (the flatness metrics, gradient alignment), which the design fixes at float32 or wider.
FORWARD, GRADIENT = "forward", "gradient"

# /proc/cpuinfo flags of x86 (avx512_bf16, amx_*) and arm64 ("bf16" in Features) that give the matmul
# kernels native low-precision arithmetic. Without them torch converts every bf16/fp16 operand to
# float32 in software: a bf16 Pythia-160m forward was 3.2x slower than fp32 on an AVX2 EPYC.
_NATIVE_FLAGS = {
    torch.bfloat16: ("avx512_bf16", "amx_bf16", "bf16"),
    torch.float16: ("avx512fp16", "amx_fp16"),
}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """``"bfloat16"`` -> torch.bfloat16 (a torch.dtype passes through, None stays None).

    Raises a one-line ValueError for any other name.
    """
    if name is None or isinstance(name, torch.dtype):
        return name
    key = str(name).strip().lower().removeprefix("torch.")
    if key not in DTYPES:
        raise ValueError(f"dtype {name!r}: unknown; use one of {', '.join(DTYPES)}")
    return DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> ``"bfloat16"`` (the form stored in a result's parameters)."""
    return str(dtype).removeprefix("torch.")


def _cpu_flags() -> frozenset[str]:
    """This CPU's feature flags from /proc/cpuinfo (x86 ``flags``, arm64 ``Features``); empty elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:  # macOS, Windows: no /proc; treat the CPU as having no native low precision
        return frozenset()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features"):
            return frozenset(value.split())
    return frozenset()


def cpu_native_dtypes(flags: frozenset[str] | set[str] | None = None) -> frozenset[torch.dtype]:
    """The low-precision dtypes this CPU multiplies natively (bfloat16, float16), from its feature flags.

    ``flags`` are /proc/cpuinfo flags (``{"avx2", "avx512_bf16", ...}``); None reads this machine's.
    torch's own ``torch.backends.cpu.get_cpu_capability()`` ("AVX2", "AVX512") cannot tell: an AVX512
    CPU without the BF16 extension still emulates bf16 matmuls. An unknown CPU counts as having none,
    the safe side: float32 is exact for bf16/fp16 weights, only slower where bf16 is native.
    """
    have = _cpu_flags() if flags is None else frozenset(f.lower() for f in flags)
    return frozenset(dtype for dtype, names in _NATIVE_FLAGS.items() if have.intersection(names))


def compute_dtype_for(
    device: str | torch.device,
    stored_dtype: str | torch.dtype | None,
    purpose: str = FORWARD,
    *,
    requested: str | torch.dtype | None = None,
    cpu_dtypes: frozenset[torch.dtype] | None = None,
) -> torch.dtype:
    """The dtype to load a checkpoint stored in ``stored_dtype`` in, to compute ``purpose`` on ``device``.

    - ``requested`` (the user's --dtype) always wins.
    - ``purpose="gradient"`` (flatness, gradient alignment): float32 (float64 stays float64), as the
      metrics' own arithmetic is anyway.
    - ``purpose="forward"`` on a CPU: the stored dtype when the CPU multiplies it natively
      (``cpu_dtypes``, default :func:`cpu_native_dtypes`), else float32 (upcast once at load: exact,
      and 3x faster than emulated bf16 here). On CUDA and other accelerators: the stored dtype.
    - An unknown ``stored_dtype`` (None) counts as float32, so nothing runs below what the key says.
    """
    chosen = parse_dtype(requested)
    if chosen is not None:
        return chosen
    if purpose not in (FORWARD, GRADIENT):
        raise ValueError(f"purpose {purpose!r}: unknown; use {FORWARD!r} or {GRADIENT!r}")
    stored = parse_dtype(stored_dtype) or torch.float32
    if stored in (torch.float32, torch.float64):
        return stored
    if purpose == GRADIENT:
        return torch.float32
    device = pick_device(device)
    if device.type == "cpu":
        native = cpu_native_dtypes() if cpu_dtypes is None else cpu_dtypes
        return stored if stored in native else torch.float32
    return stored


def stored_dtype(path: str | Path) -> torch.dtype | None:
    """The dtype a checkpoint's weights are stored in, read without loading them; None when unknown.

    ``path`` is a checkpoint folder or a file-per-step weights file. The first floating tensor of the
    first safetensors file decides; a ``.bin`` checkpoint falls back to config.json's ``dtype``
    (``torch_dtype`` before transformers 5). Unreadable files give None: loading reports them.
    """
    from analysis.runs.local import checkpoint_parts, read_safetensors_header

    folder, weights = checkpoint_parts(path)
    files = [weights] if weights is not None else sorted(Path(folder).glob("*.safetensors")) if folder.is_dir() else []
    for file in files:
        if not file.name.endswith(".safetensors"):
            continue
        try:
            header = json.loads(read_safetensors_header(file))
        except (ValueError, OSError):
            return None
        for name, entry in header.items():
            if name != "__metadata__" and isinstance(entry, dict) and entry.get("dtype") in _SAFETENSORS_DTYPES:
                return _SAFETENSORS_DTYPES[entry["dtype"]]
        break  # integer-only first shard: ask the config
    try:
        config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    value = config.get("dtype", config.get("torch_dtype")) if isinstance(config, dict) else None
    return DTYPES.get(str(value).removeprefix("torch.")) if value is not None else None


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


class _HeldRecords(logging.Handler):
    """Keeps the records it is given instead of printing them (to report or replay them later)."""

    def __init__(self, level: int) -> None:
        super().__init__(level)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


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
    catcher = _HeldRecords(logging.WARNING)
    held = catcher.records
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
    # transformers wraps PreTrainedModel.to in functools.wraps(nn.Module.to), which mypy does not bind as a method
    model.to(pick_device(device))  # type: ignore[arg-type]
    model.eval()
    return model, tokenizer
