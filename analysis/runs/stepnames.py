"""Step names: the one grammar that reads a training step (and a token count) out of a name.

Checkpoint folders and files, hub revisions, lm-eval ``model_args`` revisions and the parts of a result
file's path all name checkpoints the same ways, so one function reads them all. A trailing ``.safetensors``
or ``.bin`` is ignored, then:

1. The whole text as a name: digits alone (the folder layout ``200/``), or a keyword ``step``, ``checkpoint``,
   ``ckpt``, ``iter`` or ``global_step``, an optional ``-`` or ``_`` and the step's digits, optionally after a
   prefix that ends in ``-`` or ``_`` and before a token count ``-tokens`` or ``_tokens``, a number and a unit
   K, M, B, G or T that end the name: ``checkpoint-200``, ``step_100``, ``global_step300``, ``iter_0000200``,
   ``ckpt-200``, ``model_step100``, ``step1000-tokens4B``, ``stage1-step1000-tokens4194M``,
   ``step10-tokens1.5B``. Where the name holds several keywords, the one that ends it counts
   (``run_iter3_step100`` is step 100).
2. Otherwise a step inside the text, as revisions and file names hold one (``revision=step83000``,
   ``results_step1000``, ``step1000_final``): a keyword at the start or after a character that is not a
   letter or digit, then the digits, whatever follows them. Keywords are tried in the order ``step``,
   ``checkpoint-`` or ``checkpoint_``, ``iter``; of one keyword, the first. A token count right after the
   step is read where a non-alphanumeric character or the end follows it.

Callers that take fewer names say so where they call it: a bare number is not a hub branch
(``analysis.runs.hub.parse_revision``), and a step above 2**53 is not a real one (``base.MAX_STEP``).
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

WEIGHT_SUFFIXES = (".safetensors", ".bin")

_TOKEN_UNITS = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}

_TOKENS = r"[-_]tokens(?P<tokens>\d+(?:\.\d+)?)(?P<unit>[KMBGT]?)"

# Rule 1: a checkpoint folder or file name, read whole. The lazy prefix lets the last keyword be the step.
_NAME_RE = re.compile(
    rf"""^(?:
        (?:.*?[-_])?(?:checkpoint|global_step|step|iter|ckpt)[-_]?(?P<step>\d+)(?:{_TOKENS})?
      | (?P<bare>\d+)
    )$""",
    re.IGNORECASE | re.VERBOSE,
)

# Rule 2: a step inside longer text, keyword by keyword ("step" is the most specific word for a training step).
# Not "ckpt" nor "checkpoint" without a separator: inside free text they are too loose (ckpt_NNN may be an index).
_IN_TEXT_RES = tuple(
    re.compile(rf"(?:^|(?<=[^a-z0-9])){keyword}(?P<step>\d+)(?:{_TOKENS}(?=$|[^a-z0-9]))?", re.IGNORECASE)
    for keyword in ("step[-_]?", "checkpoint[-_]", "iter[-_]?")
)


def parse_step_name(text: str) -> tuple[int, int | None] | None:
    """Read ``(step, tokens)`` from a checkpoint name, revision or path part; None when it names no step.

    ``"checkpoint-200"`` -> (200, None); ``"step1000-tokens4B"`` -> (1000, 4_000_000_000);
    ``"model_step100.bin"`` -> (100, None); ``"200"`` -> (200, None); ``"revision=step83000"`` -> (83000, None);
    ``"main"`` -> None. The module docstring gives the whole grammar. Range checks are the caller's.
    """
    stem = text
    for suffix in WEIGHT_SUFFIXES:
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    match = _NAME_RE.match(stem)
    if match is not None and match.group("bare") is not None:
        return int(match.group("bare")), None
    if match is None:
        match = next((m for pattern in _IN_TEXT_RES if (m := pattern.search(stem)) is not None), None)
    if match is None:
        return None
    return int(match.group("step")), _tokens(match)


def _tokens(match: re.Match[str]) -> int | None:
    """The token count of a match (``tokens4B`` -> 4e9); None when it has none or it cannot be read."""
    if match.group("tokens") is None:
        return None
    try:
        return int(Decimal(match.group("tokens")) * _TOKEN_UNITS[match.group("unit").upper()])
    except InvalidOperation:
        return None
