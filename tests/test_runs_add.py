"""add_run, the code path shared by `add-run` and the Runs page: real folders, a real cache, hub refs faked offline."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest

from analysis.runs.add import add_run
from analysis.store import Store
from tests.factories import save_tiny_checkpoint
from tests.test_cli import cli


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs") / "tiny-run"
    first = save_tiny_checkpoint(root / "step_10")
    shutil.copytree(first, root / "step_20")
    (root / "log.csv").write_text("step,loss,tokens\n10,3.0,2560\n20,2.5,5120\n")
    return root


def test_a_local_folder_is_registered_with_its_log_and_stages_are_reported(run_folder: Path, db: Path) -> None:
    said: list[str] = []
    result = add_run(Store(db), run_folder, name="  ", progress=said.append)
    assert result.report.run == "tiny-run"  # a blank name means the folder's
    assert result.steps == (10, 20) and result.problems == []
    assert result.summary() == "registered run 'tiny-run': 2 checkpoints (steps 10..20), 2 new, 0 changed, 2 log values"
    assert said == ["Finding checkpoints and logs…", "Writing 2 checkpoints and 2 log values to the cache…"]
    assert list(Store(db).checkpoints("tiny-run")["tokens"]) == [2560, 5120]


@pytest.mark.parametrize(
    ("path", "options", "message"),
    [
        ("", {}, "no path: give a run folder"),
        ("/no/such/run", {}, "/no/such/run: no such folder"),
        ("RUN", {"revision_filter": "step*"}, "--revision-filter selects hub revisions"),
        ("RUN", {"revisions": "step1"}, "--revisions names hub revisions"),
        ("RUN", {"log": "/no/such/log.csv"}, "/no/such/log.csv"),
        ("hf://", {}, "no repository id"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(run_folder: Path, db: Path, path, options, message) -> None:
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        add_run(Store(db), str(run_folder) if path == "RUN" else path, **options)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not db.exists()  # not even an empty cache file


def fake_refs(*names: str) -> SimpleNamespace:
    branches = [SimpleNamespace(name=n, ref=f"refs/heads/{n}", target_commit=f"sha-{n}") for n in names]
    return SimpleNamespace(branches=branches, tags=[])


def test_a_hub_run_keeps_the_revisions_the_filter_matches(db: Path, monkeypatch) -> None:
    refs = fake_refs("main", "step1000-tokens2B", "step1500-tokens3B", "step2000-tokens4B")
    monkeypatch.setattr(huggingface_hub, "list_repo_refs", lambda repo_id: refs)
    said: list[str] = []
    result = add_run(Store(db), "hf://org/pythia-x", revision_filter="step*000-*", progress=said.append)
    assert (result.report.run, result.steps) == ("pythia-x", (1000, 2000))
    assert said[0] == "Listing the repository's revisions…"
    assert list(Store(db).checkpoints("pythia-x")["path"]) == [
        "hf://org/pythia-x@step1000-tokens2B", "hf://org/pythia-x@step2000-tokens4B",
    ]  # fmt: skip


def test_the_cli_takes_the_same_filter(db: Path, monkeypatch) -> None:
    monkeypatch.setattr(huggingface_hub, "list_repo_refs", lambda repo_id: fake_refs("step1", "step2", "step30"))
    code, out, err = cli("add-run", "hf://org/m", "--revision-filter", "re:^step\\d$", "--db", str(db))
    assert (code, err) == (0, "") and "2 checkpoints (steps 1..2)" in out
    code, _, err = cli("add-run", "hf://org/m", "--revision-filter", "nothing*", "--db", str(db), "--name", "other")
    assert code == 2 and err.startswith("error: hf://org/m: no revision matches") and err.count("\n") == 1
    assert list(Store(db).runs()["name"]) == ["m"]
