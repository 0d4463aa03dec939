"""HF Hub revisions as a run source, without the network: given refs, or a stand-in for list_repo_refs."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest

from analysis.runs import hub_checkpoints, load_run, parse_hub_path, parse_revision


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("step1000", (1000, None)),
        ("step0", (0, None)),
        ("step5000-tokens20B", (5000, 20_000_000_000)),
        ("step1000-tokens4194M", (1000, 4_194_000_000)),
        ("step10000-tokens41B", (10000, 41_000_000_000)),
        ("step477000-tokens2000B", (477000, 2_000_000_000_000)),
        ("stage1-step1000-tokens5B", (1000, 5_000_000_000)),
        ("main", None),
        ("v1.0", None),
        ("1000", None),
        ("refs/pr/1", None),
        ("", None),
    ],
)
def test_parse_revision(ref: str, expected: tuple[int, int | None] | None) -> None:
    assert parse_revision(ref) == expected


def test_parse_hub_path() -> None:
    assert parse_hub_path("hf://EleutherAI/pythia-70m") == ("EleutherAI/pythia-70m", None)
    assert parse_hub_path("hf://allenai/OLMoE-1B-7B-0924@step5000-tokens20B") == (
        "allenai/OLMoE-1B-7B-0924",
        "step5000-tokens20B",
    )
    with pytest.raises(ValueError, match="no repository id"):
        parse_hub_path("hf://")


def test_given_refs_are_parsed_sorted_and_filtered() -> None:
    refs = ["step3000", "main", "step1000", "not-a-step", "step2000"]
    checkpoints = hub_checkpoints("EleutherAI/pythia-14m", refs)
    assert [c.step for c in checkpoints] == [1000, 2000, 3000]
    first = checkpoints[0]
    assert first.path == "hf://EleutherAI/pythia-14m@step1000"
    assert first.revision == "step1000"
    assert first.fingerprint == "EleutherAI/pythia-14m@step1000"
    assert hub_checkpoints("hf://EleutherAI/pythia-14m", ["main"]) == []


def test_same_step_keeps_the_ref_with_more_tokens() -> None:
    refs = ["stage2-step1000-tokens2B", "stage1-step1000-tokens5B", "step2000-tokens9B"]
    checkpoints = hub_checkpoints("allenai/OLMo-2", refs)
    assert [(c.step, c.revision) for c in checkpoints] == [
        (1000, "stage1-step1000-tokens5B"),
        (2000, "step2000-tokens9B"),
    ]


def fake_refs(*names: str) -> SimpleNamespace:
    branches = [SimpleNamespace(name=name, ref=f"refs/heads/{name}", target_commit=f"sha-{name}") for name in names]
    return SimpleNamespace(branches=branches, tags=[SimpleNamespace(name="step9", target_commit="sha-tag")])


def test_listed_refs_use_commit_shas(monkeypatch: pytest.MonkeyPatch) -> None:
    asked = []

    def list_repo_refs(repo_id: str) -> SimpleNamespace:
        asked.append(repo_id)
        return fake_refs("main", "step20-tokens1M", "step10-tokens500K")

    monkeypatch.setattr(huggingface_hub, "list_repo_refs", list_repo_refs)
    checkpoints = hub_checkpoints("org/model")
    assert asked == ["org/model"]
    assert [(c.step, c.tokens) for c in checkpoints] == [(9, None), (10, 500_000), (20, 1_000_000)]
    assert checkpoints[1].fingerprint == "org/model@sha-step10-tokens500K"
    assert checkpoints[1].path == "hf://org/model@step10-tokens500K"


def test_listing_failure_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def list_repo_refs(repo_id: str) -> SimpleNamespace:
        raise ConnectionError("Failed to resolve 'huggingface.co'\nmore detail")

    monkeypatch.setattr(huggingface_hub, "list_repo_refs", list_repo_refs)
    with pytest.raises(ValueError) as err:
        hub_checkpoints("org/model")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("cannot list revisions of org/model: Failed to resolve")
    assert "name them with --revisions step1000,step2000" in message and "--refs" not in message


def test_load_run_from_hub_without_network(tmp_path: Path) -> None:
    run = load_run("hf://EleutherAI/pythia-70m", refs=["main", "step143000", "step1000"])
    assert (run.name, run.source) == ("pythia-70m", "hf://EleutherAI/pythia-70m")
    assert [c.step for c in run.checkpoints] == [1000, 143000]
    assert run.log.empty and run.problems == []
    single = load_run("hf://allenai/OLMoE-1B-7B-0924@step5000-tokens20B", name="olmoe")
    assert [(c.step, c.tokens, c.revision) for c in single.checkpoints] == [(5000, 20 * 10**9, "step5000-tokens20B")]
    log = tmp_path / "pythia.csv"
    log.write_text("step,loss,tokens\n1000,3.0,2097152000\n")
    with_log = load_run("hf://EleutherAI/pythia-70m", refs=["step1000"], log=log)
    assert with_log.checkpoints[0].tokens == 2_097_152_000
    assert with_log.log["value"].tolist() == [3.0]
    with pytest.raises(ValueError, match="no usable checkpoints"):
        load_run("hf://EleutherAI/pythia-70m", refs=["main"])


@pytest.mark.parametrize(
    ("pattern", "kept"),
    [
        ("step*000", ["step1000", "step2000", "step10000"]),  # a glob matches the whole name
        ("step?000", ["step1000", "step2000"]),
        ("re:^step\\d000$", ["step1000", "step2000"]),
        ("step\\d+000$", ["step1000", "step2000", "step10000"]),  # a regex-only character: searched as a regex
        ("(1|2)000$", ["step1000", "step2000"]),  # not step10000: its last four digits are 0000
        ("stage1-*", ["stage1-step500-tokens1B"]),
    ],
)
def test_revision_filter_globs_and_regexes(pattern: str, kept: list[str]) -> None:
    refs = ["main", "step500", "step1000", "step1500", "step2000", "step10000", "stage1-step500-tokens1B"]
    assert sorted(c.revision for c in hub_checkpoints("org/model", refs, pattern)) == sorted(kept)


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("", "--revision-filter is empty"),
        ("re:step(", "not a valid regular expression"),
        ("checkpoint-*", "no revision matches --revision-filter 'checkpoint-*' (3 revisions, e.g. main, step1, step2)"),
    ],
)
def test_a_bad_or_empty_filter_is_one_line(pattern: str, message: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        hub_checkpoints("org/model", ["step1", "step2", "main"], pattern)
    assert "\n" not in str(err.value)
    if "matches" not in message:  # a broken filter fails before the repository is listed online
        monkeypatch.setattr(huggingface_hub, "list_repo_refs", lambda repo_id: pytest.fail("listed online"))
        with pytest.raises(ValueError, match=re.escape(message)):
            hub_checkpoints("org/model", None, pattern)


def test_listed_refs_are_filtered_before_anything_is_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huggingface_hub, "list_repo_refs", lambda repo_id: fake_refs("step10-tokens500K", "step20"))
    run = load_run("hf://org/model", revision_filter="step2*")
    assert [(c.step, c.fingerprint) for c in run.checkpoints] == [(20, "org/model@sha-step20")]
    with pytest.raises(ValueError, match="--revision-filter selects hub revisions; use it with hf://ORG/MODEL"):
        load_run("/some/folder", revision_filter="step*")
