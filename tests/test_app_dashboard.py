"""The dashboard as a new user drives it (AppTest, real cache files): samples shown as answer strings."""

from __future__ import annotations

from pathlib import Path

from analysis.store import SampleRow, Store
from tests.test_app import open_app


def test_samples_page_shows_choice_strings_not_indices(divergence_db: Path, monkeypatch) -> None:
    choices = [" 61", " 43", " 84", " 71"]
    rows = [
        SampleRow("grok", step, "toy/acc,none", "h", "0", value,
                  {"prompt": "20 + 51 =", "target": "3", "response": response, "choices": choices})
        for step, value, response in ((10, 0.0, "1"), (40, 1.0, "3"))
    ]  # fmt: skip
    Store(divergence_db).write_results([], rows)
    at = open_app(divergence_db, monkeypatch, page="pages/samples.py", sample_run="grok")
    assert not at.exception and not at.error
    table = at.dataframe[0].value.set_index("sample_id")
    assert table.loc["0", "target"] == "71" and table.loc["0", "response"] == "71"
