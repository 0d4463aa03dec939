"""Multiple-choice items shown by their answer strings: where the choices are found, and what is left alone."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from analysis.samples import answer_text, choice_strings, flip_summary

CHOICES = [" 61", " 43", " 84", " 71"]


@pytest.mark.parametrize(
    "record",
    [
        {"choices": CHOICES},
        {"arguments": [["20 + 51 =", c] for c in CHOICES]},
        # lm-eval's --log_samples files: one gen_args_i per choice, each {"arg_0": context, "arg_1": choice}.
        {"arguments": {f"gen_args_{i}": {"arg_0": "20 + 51 =", "arg_1": c} for i, c in enumerate(CHOICES)}},
        {"doc": {"choices": CHOICES}},
        {"doc": {"choices": {"text": CHOICES, "label": ["A", "B", "C", "D"]}}},
    ],
)
def test_choices_are_found_where_lm_eval_keeps_them(record: dict) -> None:
    assert choice_strings(record) == CHOICES


def test_gen_args_beyond_nine_keep_their_order() -> None:
    choices = [f" c{i}" for i in range(12)]
    record = {"arguments": {f"gen_args_{i}": {"arg_0": "q", "arg_1": c} for i, c in enumerate(choices)}}
    assert choice_strings(record) == choices


@pytest.mark.parametrize(
    "record", [{}, {"choices": []}, {"arguments": [["only one request", " x"]]}, {"doc": "text"}, {"choices": [{}]}]
)
def test_records_without_choices_give_none(record: dict) -> None:
    assert choice_strings(record) is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("3", "71"),  # stored records keep the index as text
        (0, "61"),
        ("[1, 2]", "43 | 84"),  # several right answers
        ([3], "71"),
        ("7", "7"),  # out of range: shown as it is, never a wrong choice
        ("-1", "-1"),
        ("yes", "yes"),  # already an answer string
        (None, ""),
        (True, "True"),
    ],
)
def test_answer_text_maps_indices_to_choice_strings(value, expected: str) -> None:
    assert answer_text(value, CHOICES) == expected


def test_without_choices_the_value_is_shown_as_stored() -> None:
    assert answer_text("3", None) == "3"
    assert answer_text("3", []) == "3"


def test_flip_summary_shows_answer_strings_for_target_and_last_response() -> None:
    def record(response: int) -> str:
        return json.dumps({"prompt": "20 + 51 =", "target": "3", "response": str(response), "choices": CHOICES})

    rows = pd.DataFrame(
        {
            "step": [10, 20, 10, 20],
            "params_hash": "h",
            "sample_id": ["0", "0", "1", "1"],
            "value": [0.0, 1.0, 1.0, 1.0],
            "record": [record(1), record(3), record(3), record(3)],
        }
    )
    rows.loc[3, "record"] = json.dumps({"prompt": "9 + 9 =", "target": "exact text", "response": "exact text"})
    summary = flip_summary(rows).set_index("sample_id")
    assert summary.loc["0", "target"] == "71" and summary.loc["0", "response"] == "71"  # the last checkpoint's
    assert summary.loc["1", ["target", "response"]].tolist() == ["exact text", "exact text"]
