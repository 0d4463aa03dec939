"""The step-name grammar: every name a checkpoint folder, file, hub revision or result path uses, and bad names.

One table for the one parser (analysis.runs.stepnames) and the two places that read step names with it:
checkpoint discovery (``parse_step_name``) and lm-eval result import (``step_from_text``).
"""

from __future__ import annotations

import pytest

from analysis.evals.lmeval import step_from_text
from analysis.runs import parse_revision
from analysis.runs.local import parse_step_name as local_parse_step_name
from analysis.runs.stepnames import parse_step_name

NAMES = [
    # checkpoint folders and files (analysis.runs.local)
    ("checkpoint-200", (200, None)),
    ("checkpoint_200", (200, None)),
    ("checkpoint200", (200, None)),
    ("step_100", (100, None)),
    ("step-100", (100, None)),
    ("step100", (100, None)),
    ("STEP10", (10, None)),
    ("global_step300", (300, None)),
    ("iter_0000200", (200, None)),
    ("iter200", (200, None)),
    ("ckpt-200", (200, None)),
    ("ckpt_007", (7, None)),
    ("200", (200, None)),
    ("0", (0, None)),
    ("step1000-tokens4B", (1000, 4_000_000_000)),
    ("step1000-tokens4194M", (1000, 4_194_000_000)),
    ("step5-tokens123", (5, 123)),
    ("step7-tokens2K", (7, 2_000)),
    ("step7_tokens3g", (7, 3_000_000_000)),
    ("step7-tokens1T", (7, 10**12)),
    ("step10-tokens1.5B", (10, 1_500_000_000)),
    ("stage1-step1000-tokens5B", (1000, 5_000_000_000)),
    ("step_100.safetensors", (100, None)),
    ("model_step100.bin", (100, None)),
    ("100.safetensors", (100, None)),
    ("200.BIN", (200, None)),
    # revisions and result-file path parts (analysis.evals.lmeval)
    ("step83000", (83000, None)),
    ("revision=step83000", (83000, None)),
    ("results_step1000", (1000, None)),
    ("step1000_final", (1000, None)),
    ("run.step42", (42, None)),
    ("stage1-step20000-tokens84B", (20000, 84_000_000_000)),
    ("step5-tokens4Bx", (5, None)),  # a token count glued to more text is not read
    ("step5-tokens", (5, None)),
    # several keywords in a name: the one that ends it
    ("checkpoint-5_step10", (10, None)),
    ("step5_iter10", (10, None)),
    ("step1_step2", (2, None)),
    ("ckpt_3-checkpoint-9", (9, None)),
    # several keywords inside longer text: step, checkpoint- or checkpoint_, iter; of one keyword the first
    ("iter3_step5_x", (5, None)),
    ("iter3_checkpoint-4.x", (4, None)),
    ("checkpoint4_iter3.x", (3, None)),
    ("step1_step2x", (1, None)),
    ("step5-tokens4B_final", (5, 4_000_000_000)),
]

BAD = [
    "",
    "main",
    "runs",
    "v2",
    "model.safetensors",
    "pytorch_model.bin",
    "model-00001-of-00002.safetensors",
    "training_args.bin",
    "latest_checkpointed_iteration",
    "xstep5",  # a keyword inside a word
    "mystep_5",
    "checkpoint-",
    "step",
    "steps",
    "step-_5",
    "12a",
    "-12",
    "1.5",
    "results_2024-06-01T12-34-56.789",  # lm-eval's time-stamped result names
    "pretrained=/models/run7",
    "revision=ckpt_5",  # ckpt and checkpoint without a separator count only as a whole name
    "a.checkpoint5",
    "checkpoint5_final",
]


@pytest.mark.parametrize(("name", "expected"), NAMES)
def test_step_names(name: str, expected: tuple[int, int | None]) -> None:
    assert parse_step_name(name) == expected
    assert local_parse_step_name(name) == expected  # the name checkpoint discovery imports
    assert step_from_text(name) == expected[0]  # result import reads the same step


@pytest.mark.parametrize("name", BAD)
def test_names_without_a_step(name: str) -> None:
    assert parse_step_name(name) is None
    assert step_from_text(name) is None


def test_hub_revisions_take_the_grammar_less_bare_numbers() -> None:
    # A bare number is a folder name, never a hub branch: parse_revision keeps that rule over the grammar.
    assert parse_revision("200") is None and parse_step_name("200") == (200, None)
    assert parse_revision("step5000-tokens20B") == (5000, 20_000_000_000)
    assert parse_revision(" ckpt_012 ") == (12, None)
