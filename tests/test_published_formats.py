"""Runs as they are published: lm-eval 0.3 / 0.4 result sweeps, Trainer folders without weights, Git LFS
pointers, hub revisions named offline, LLM360's ckpt_NNN revisions, MMLU without its group row."""

from __future__ import annotations

import io
import json
import math
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import huggingface_hub
import pytest

from analysis.__main__ import main
from analysis.evals.lmeval import EvalRow, group_means, parse_results_file
from analysis.store import Store
from tests.published_formats import (
    LFS_POINTER,
    lmeval03,
    lmeval04,
    pythia_sweep,
    trainer_state,
    weightless_trainer_run,
    write_json,
    write_lfs_pointer,
)

LFS_FIX = "is a Git LFS pointer, not the file itself; fetch it with `git lfs pull` (or download it) and try again"


def cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def values(db: Path, run: str, metric: str) -> dict[int, float]:
    table = Store(db).results(run, [metric])
    assert not table.duplicated("step").any(), table  # one value per checkpoint
    return dict(zip(table["step"].tolist(), table["value"].tolist(), strict=True))


def one_line_error(code: int, err: str) -> str:
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


# --------------------------------------------------------------------------- import-evals creates its run


def test_import_evals_creates_the_run_from_a_folder_of_steps(tmp_path: Path, db: Path) -> None:
    sweep = pythia_sweep(tmp_path / "pythia-70m", steps=(1000, 2000, 3000))
    code, out, err = cli("import-evals", str(sweep), "--run", "p70", "--db", str(db))
    assert (code, err) == (0, "")
    assert "created run 'p70' (no local checkpoints; imported results only)" in out.splitlines()
    assert "imported 12 values into run 'p70'" in out
    runs = Store(db).runs().set_index("name")
    assert runs.loc["p70", "checkpoints"] == 3 and runs.loc["p70", "source"] == f"imported:{sweep.resolve()}"
    assert values(db, "p70", "lambada_openai/ppl,none") == {1000: 4000.0, 2000: 2000.0, 3000: 4000.0 / 3}
    # A second import into the run it made says nothing about creating it.
    more = pythia_sweep(tmp_path / "more", steps=(4000,))
    code, out, _ = cli("import-evals", str(more), "--run", "p70", "--db", str(db))
    assert code == 0 and "created run" not in out
    assert Store(db).runs().set_index("name").loc["p70", "checkpoints"] == 4


@pytest.mark.parametrize("bad", ["broken file", "missing path", "pointer"])
def test_a_failing_import_creates_no_run(tmp_path: Path, db: Path, bad: str) -> None:
    Store(db).migrate()
    sweep = pythia_sweep(tmp_path / "sweep", steps=(1000, 2000))
    if bad == "broken file":
        (sweep / "step3000.json").write_text('{"results": {"piqa": {"acc": 0.6')  # cut mid-write
        path, named = sweep, sweep / "step3000.json"
    elif bad == "missing path":
        path = named = tmp_path / "no such folder.json"
    else:
        named = write_lfs_pointer(sweep / "step3000.json")
        path = sweep
    before = Store(db).generation()
    err = one_line_error(*cli("import-evals", str(path), "--run", "p70", "--db", str(db))[::2])
    assert str(named) in err
    assert Store(db).runs().empty and Store(db).checkpoints("p70").empty
    assert Store(db).generation() == before  # nothing committed at all
    if bad == "pointer":
        assert LFS_FIX in err


# --------------------------------------------------------------------------- two files for one step


def scores(acc: float) -> dict:
    return {"arc_easy": {"acc,none": acc, "acc_stderr,none": 0.01}, "piqa": {"acc,none": acc + 0.2}}


def test_two_files_for_one_step_keep_the_one_with_the_later_date(tmp_path: Path, db: Path) -> None:
    folder = tmp_path / "sweep"
    # Named so that name order would pick the older file: the date decides, not the name.
    older = write_json(folder / "z_results.json", lmeval04(123000, scores(0.41), date=1_700_000_000.0))
    newer = write_json(folder / "a_results.json", lmeval04(123000, scores(0.43), date=1_710_000_000.0))
    write_json(folder / "other.json", lmeval04(122000, scores(0.40), date=1_690_000_000.0))
    code, out, err = cli("import-evals", str(folder), "--run", "p70", "--db", str(db))
    assert code == 0, err
    [warning] = err.splitlines()  # one line for the one step with two files
    assert warning.startswith("warning: step 123000: 2 result files")
    assert f"kept {newer} (lm-eval date 2024-03-09 16:00:00 UTC)" in warning
    assert f"dropped 2 values of {older} (lm-eval date 2023-11-14 22:13:20 UTC)" in warning
    assert "newer lm-eval date" in warning
    assert "imported 4 values" in out
    assert values(db, "p70", "arc_easy/acc,none") == {122000: 0.40, 123000: 0.43}
    assert values(db, "p70", "piqa/acc,none") == pytest.approx({122000: 0.60, 123000: 0.63})
    stored = Store(db).results("p70", ["arc_easy/acc,none"]).set_index("step")
    assert json.loads(stored.loc[123000, "params"])["imported_from"] == str(newer.resolve())


def test_without_dates_the_later_modification_time_wins(tmp_path: Path, db: Path) -> None:
    folder = tmp_path / "sweep"
    write_json(folder / "b.json", lmeval03(5000, {"piqa": {"acc": 0.61}}), mtime=1_600_000_000)
    kept = write_json(folder / "a.json", lmeval03(5000, {"piqa": {"acc": 0.62}}), mtime=1_600_000_100)
    code, _, err = cli("import-evals", str(folder), "--run", "p70", "--db", str(db))
    assert code == 0 and err.count("\n") == 1
    assert f"kept {kept} (modified 2020-09-13 12:28:20 UTC)" in err and "newer modification time" in err
    assert values(db, "p70", "piqa/acc,none") == {5000: 0.62}


def test_same_time_falls_back_to_the_later_file_name(tmp_path: Path, db: Path) -> None:
    folder = tmp_path / "sweep"
    write_json(folder / "a.json", lmeval03(5000, {"piqa": {"acc": 0.61}}), mtime=1_600_000_000)
    write_json(folder / "b.json", lmeval03(5000, {"piqa": {"acc": 0.62}}), mtime=1_600_000_000)
    code, _, err = cli("import-evals", str(folder), "--run", "p70", "--db", str(db))
    assert code == 0 and "same time, later file name" in err and f"kept {folder / 'b.json'}" in err
    assert values(db, "p70", "piqa/acc,none") == {5000: 0.62}


def test_two_files_of_different_settings_for_one_step_are_both_kept(tmp_path: Path, db: Path) -> None:
    folder = tmp_path / "sweep"
    write_json(folder / "zero.json", lmeval04(9000, scores(0.5), date=1_700_000_000.0, shots=0))
    write_json(folder / "five.json", lmeval04(9000, scores(0.6), date=1_600_000_000.0, shots=5))
    code, out, err = cli("import-evals", str(folder), "--run", "p70", "--db", str(db))
    assert (code, err) == (0, "") and "imported 4 values" in out
    shots = Store(db).results("p70", ["arc_easy/acc,none"])["params"].map(lambda p: json.loads(p)["num_fewshot"])
    assert sorted(shots) == [0, 5]


# --------------------------------------------------------------------------- Trainer folders without weights


def test_a_weightless_trainer_folder_registers_its_log_and_lists_its_checkpoints(tmp_path: Path, db: Path) -> None:
    run = weightless_trainer_run(tmp_path / "gpt small", saves=(100, 200, 300))
    code, out, err = cli("add-run", str(run), "--db", str(db))
    assert code == 0, err
    assert "registered run 'gpt small': 3 checkpoints (steps 100..300)" in out
    [line] = err.splitlines()
    assert line.startswith(f"warning: {run.resolve()}: 3 of 3 checkpoints (steps 100..300) have no weights here")
    store = Store(db)
    ckpts = store.checkpoints("gpt small")
    assert ckpts["fingerprint"].tolist() == [f"no-weights:checkpoint-{s}" for s in (100, 200, 300)]
    # The whole history, from the latest checkpoint's trainer_state.json.
    log = store.log_series("gpt small", ["train/loss"])
    expected = {e["step"]: e["loss"] for e in trainer_state(range(10, 301, 10))["log_history"] if "loss" in e}
    assert dict(zip(log["step"], log["value"], strict=True)) == expected and len(expected) == 30
    assert len(store.log_series("gpt small", ["eval/loss"])) == 3
    # Again: nothing changes.
    code, out, _ = cli("add-run", str(run), "--db", str(db))
    assert code == 0 and "0 new, 0 changed" in out
    # Results imported for one of its steps attach to that checkpoint.
    result = write_json(tmp_path / "r" / "step200.json", lmeval03(200, {"piqa": {"acc": 0.55}}))
    assert cli("import-evals", str(result), "--run", "gpt small", "--db", str(db))[0] == 0
    stored = store.results("gpt small")
    assert stored[["step", "value"]].values.tolist() == [[200, 0.55]]


def test_a_weightless_checkpoint_never_drops_results_already_imported(tmp_path: Path, db: Path) -> None:
    result = write_json(tmp_path / "r" / "step200.json", lmeval03(200, {"piqa": {"acc": 0.55}}))
    assert cli("import-evals", str(result), "--run", "gpt", "--db", str(db))[0] == 0
    run = weightless_trainer_run(tmp_path / "gpt", saves=(100, 200))
    code, out, _ = cli("add-run", str(run), "--db", str(db))
    assert code == 0 and "1 new, 0 changed" in out
    assert values(db, "gpt", "piqa/acc,none") == {200: 0.55}
    assert Store(db).checkpoints("gpt").set_index("step").loc[200, "fingerprint"].startswith("imported:")


def test_a_weightless_checkpoint_cannot_be_loaded_and_says_why(tmp_path: Path) -> None:
    from analysis.models import load_model

    run = weightless_trainer_run(tmp_path / "gpt", saves=(100,))
    with pytest.raises(ValueError, match=r"no weights here, only trainer_state\.json; download the weights"):
        load_model(run / "checkpoint-100")


def test_checkpoint_folders_with_neither_weights_nor_trainer_state_still_fail(tmp_path: Path, db: Path) -> None:
    run = weightless_trainer_run(tmp_path / "gpt", saves=(100,))
    (run / "checkpoint-100" / "trainer_state.json").unlink()
    err = one_line_error(*cli("add-run", str(run), "--db", str(db))[::2])
    assert "no usable checkpoints or training log" in err and "no weights" in err


# --------------------------------------------------------------------------- Git LFS pointers


@pytest.mark.parametrize(
    "name", ["metrics.csv", "train.jsonl", "trainer_state.json", "events.out.tfevents.1700000000.node1"]
)
def test_a_log_that_is_an_lfs_pointer_says_so(tmp_path: Path, db: Path, name: str) -> None:
    run = weightless_trainer_run(tmp_path / "run", saves=(100,))
    pointer = write_lfs_pointer(tmp_path / "logs" / name)
    err = one_line_error(*cli("add-run", str(run), "--log", str(pointer), "--db", str(db))[::2])
    assert err == f"error: {pointer} {LFS_FIX}\n"
    assert not db.exists() or Store(db).runs().empty


def test_weights_that_are_lfs_pointers_say_so(tmp_path: Path, db: Path) -> None:
    run = tmp_path / "cloned run"
    for step in (10, 20):
        write_json(run / f"step_{step}" / "config.json", {"model_type": "gpt_neox"})
        write_lfs_pointer(run / f"step_{step}" / "model.safetensors")
    err = one_line_error(*cli("add-run", str(run), "--db", str(db))[::2])
    assert f"{run.resolve() / 'step_10' / 'model.safetensors'} {LFS_FIX}" in err
    assert "no scalar values" not in err and "truncated" not in err


def test_a_pointer_found_as_a_log_is_a_warning_and_the_rest_registers(tmp_path: Path, db: Path) -> None:
    run = weightless_trainer_run(tmp_path / "run", saves=(100, 200))
    write_lfs_pointer(run / "runs" / "Jan01" / "events.out.tfevents.1700000000.node1")
    code, out, err = cli("add-run", str(run), "--db", str(db))
    assert code == 0 and "2 checkpoints" in out
    pointer_lines = [line for line in err.splitlines() if LFS_FIX in line]
    assert len(pointer_lines) == 1 and "events.out.tfevents.1700000000.node1" in pointer_lines[0]
    assert len(Store(db).log_series("run", ["train/loss"])) == 20  # the trainer_state.json log still came in


def test_model_loading_refuses_pointer_weights_and_config(tmp_path: Path) -> None:
    from analysis.models import load_model, read_config

    folder = tmp_path / "ckpt"
    write_json(folder / "config.json", {"model_type": "gpt_neox"})
    write_lfs_pointer(folder / "model.safetensors")
    with pytest.raises(ValueError) as err:
        load_model(folder)
    assert str(err.value) == f"{folder / 'model.safetensors'} {LFS_FIX}"
    write_lfs_pointer(folder / "config.json")
    with pytest.raises(ValueError, match=r"config\.json is a Git LFS pointer"):
        read_config(folder)


def test_a_real_file_that_starts_differently_is_not_a_pointer(tmp_path: Path) -> None:
    from analysis.runs.base import lfs_pointer_problem

    assert lfs_pointer_problem(write_lfs_pointer(tmp_path / "p")) is not None
    (tmp_path / "csv").write_text("step,loss\n" + LFS_POINTER)  # the text inside, not at the start
    (tmp_path / "big").write_bytes(LFS_POINTER.encode() + b"\0" * 4096)  # too big to be a pointer
    assert lfs_pointer_problem(tmp_path / "csv") is None
    assert lfs_pointer_problem(tmp_path / "big") is None
    assert lfs_pointer_problem(tmp_path / "absent") is None


# --------------------------------------------------------------------------- hub revisions named offline


def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def list_repo_refs(repo_id: str):
        raise OSError("offline mode is enabled")

    monkeypatch.setattr(huggingface_hub, "list_repo_refs", list_repo_refs)


def test_add_run_offline_says_how_to_name_revisions(monkeypatch: pytest.MonkeyPatch, db: Path) -> None:
    no_network(monkeypatch)
    err = one_line_error(*cli("add-run", "hf://EleutherAI/pythia-70m", "--db", str(db))[::2])
    assert "--revisions step1000,step2000" in err and "--refs" not in err


@pytest.mark.parametrize("as_file", [False, True])
def test_add_run_takes_revisions_offline(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, db: Path, as_file: bool
) -> None:
    no_network(monkeypatch)
    names = "step1000,main,step143000"
    if as_file:
        (tmp_path / "revisions.txt").write_text(names.replace(",", "\n") + "\n")
        names = str(tmp_path / "revisions.txt")
    code, out, err = cli("add-run", "hf://EleutherAI/pythia-70m", "--revisions", names, "--db", str(db))
    assert (code, err) == (0, "")
    assert "registered run 'pythia-70m': 2 checkpoints (steps 1000..143000)" in out
    assert Store(db).checkpoints("pythia-70m")["revision"].tolist() == ["step1000", "step143000"]


@pytest.mark.parametrize(
    ("path", "revisions", "message"),
    [("local", "step1", "--revisions names hub revisions"), ("hf://org/model", " , ", "no revision names")],
)
def test_bad_revisions_are_one_line(tmp_path: Path, db: Path, path: str, revisions: str, message: str) -> None:
    if path == "local":
        path = str(weightless_trainer_run(tmp_path / "run", saves=(100,)))
    err = one_line_error(*cli("add-run", path, "--revisions", revisions, "--db", str(db))[::2])
    assert message in err


# --------------------------------------------------------------------------- LLM360 ckpt_NNN revisions

AMBER = ("hf://LLM360/Amber", "--revisions", "ckpt_000,ckpt_001,ckpt_002")


def test_ckpt_revisions_are_indices_and_say_so(db: Path) -> None:
    code, out, err = cli("add-run", *AMBER, "--db", str(db))
    assert code == 0 and "3 checkpoints (steps 0..2)" in out
    [warning] = err.splitlines()
    assert "3 checkpoints are named ckpt_NNN" in warning and "checkpoint indices, not steps" in warning
    assert "--step-map" in warning and "--steps-per-checkpoint" in warning


def test_a_step_map_gives_ckpt_revisions_their_steps_and_tokens(tmp_path: Path, db: Path) -> None:
    step_map = tmp_path / "amber.csv"
    step_map.write_text("checkpoint,step,tokens\n0,0,0\nckpt_001,2000,4194304000\nckpt_002,4000,8388608000\n")
    code, out, err = cli("add-run", *AMBER, "--step-map", str(step_map), "--db", str(db))
    assert (code, err) == (0, "") and "3 checkpoints (steps 0..4000)" in out
    ckpts = Store(db).checkpoints("Amber")
    assert ckpts[["step", "tokens", "revision"]].values.tolist() == [
        [0, 0, "ckpt_000"], [2000, 4194304000, "ckpt_001"], [4000, 8388608000, "ckpt_002"]
    ]  # fmt: skip


def test_steps_per_checkpoint_multiplies_the_index(db: Path) -> None:
    code, _, err = cli("add-run", *AMBER, "--steps-per-checkpoint", "2000", "--db", str(db))
    assert (code, err) == (0, "")
    assert Store(db).checkpoints("Amber")["step"].tolist() == [0, 2000, 4000]


@pytest.mark.parametrize(
    ("text", "extra", "message"),
    [
        ("revision,step\nckpt_000,0\n", (), "no row for ckpt_001 (and 1 more)"),
        ("revision,step\nckpt_000,zero\n", (), "line 2: step 'zero' is not a whole number"),
        ("name,step\nckpt_000,0\n", (), "needs columns revision (or checkpoint) and step"),
        ("revision,step\nckpt_000,0\nckpt_001,0\nckpt_002,5\n", (), "both map to step 0"),
        ("revision,step\nckpt_000,0\nckpt_000,1\n", (), "ckpt_000 appears twice"),
        ("revision,step\nckpt_000,0\n", ("--steps-per-checkpoint", "5"), "not both"),
    ],
)
def test_bad_step_maps_are_one_line_and_write_nothing(tmp_path: Path, db: Path, text, extra, message) -> None:
    step_map = tmp_path / "steps map.csv"
    step_map.write_text(text)
    err = one_line_error(*cli("add-run", *AMBER, "--step-map", str(step_map), *extra, "--db", str(db))[::2])
    assert message in err
    if "not both" not in message:
        assert str(step_map) in err
    assert not db.exists() or Store(db).runs().empty


def test_steps_per_checkpoint_needs_ckpt_names(db: Path) -> None:
    args = ("hf://EleutherAI/pythia-70m", "--revisions", "step1000", "--steps-per-checkpoint", "10")
    err = one_line_error(*cli("add-run", *args, "--db", str(db))[::2])
    assert "no checkpoints named ckpt_NNN" in err and "--step-map" in err


# --------------------------------------------------------------------------- group means (MMLU)

SUBJECTS = {  # acc, acc_stderr, acc_norm, acc_norm_stderr
    "abstract_algebra": (0.22, 0.0416, 0.25, 0.0435),
    "anatomy": (0.30, 0.0396, 0.28, 0.0388),
    "astronomy": (0.24, 0.0347, 0.31, 0.0376),
    "virology": (0.27, 0.0345, 0.26, 0.0341),
}


def mmlu03(step: int, *, drop_norm: str | None = None) -> dict:
    tasks = {}
    for subject, (acc, se, norm, norm_se) in SUBJECTS.items():
        tasks[f"hendrycksTest-{subject}"] = {"acc": acc, "acc_stderr": se, "acc_norm": norm, "acc_norm_stderr": norm_se}
        if subject == drop_norm:
            del tasks[f"hendrycksTest-{subject}"]["acc_norm"]
    tasks["piqa"] = {"acc": 0.6, "acc_stderr": 0.011}
    data = lmeval03(step, tasks)
    data["config"]["num_fewshot"] = 5
    return data


def test_mmlu_mean_is_added_to_a_03_file_with_a_few_subjects(tmp_path: Path, db: Path) -> None:
    path = write_json(tmp_path / "results_step3000.json", mmlu03(3000))
    code, out, err = cli("import-evals", str(path), "--run", "p70", "--db", str(db))
    assert (code, err) == (0, "") and "9 values (+2 group means)" in out
    table = Store(db).results("p70").set_index("metric")
    acc = table.loc["mmlu/acc,none"]
    assert acc["value"] == pytest.approx((0.22 + 0.30 + 0.24 + 0.27) / 4, abs=1e-12)
    se = [s[1] for s in SUBJECTS.values()]
    assert acc["stderr"] == pytest.approx(math.sqrt(sum(e * e for e in se)) / 4, abs=1e-12)
    params = json.loads(acc["params"])
    assert params["derived"] == "mean of 4 hendrycksTest-* subjects" and params["subjects"] == 4
    assert params["num_fewshot"] == 5
    assert table.loc["mmlu/acc_norm,none", "value"] == pytest.approx((0.25 + 0.28 + 0.31 + 0.26) / 4, abs=1e-12)
    assert not any(m.startswith("piqa") and "mmlu" in m for m in table.index)


def test_a_metric_some_subject_lacks_is_not_averaged() -> None:
    rows = []
    for subject, (acc, se, norm, _) in SUBJECTS.items():
        rows.append(EvalRow(f"hendrycksTest-{subject}", "acc,none", acc, se, 100, 0, "0"))
        if subject != "anatomy":
            rows.append(EvalRow(f"hendrycksTest-{subject}", "acc_norm,none", norm, None, 100, 0, "0"))
    derived, notes = group_means(rows)
    assert [(d.row.name, d.subjects) for d in derived] == [("mmlu/acc,none", 4)]  # acc_norm: anatomy lacks it
    assert derived[0].row.n == 400 and notes == []


def test_04_files_with_the_group_get_nothing_derived_and_subgroups_are_not_subjects(tmp_path: Path) -> None:
    subjects = {f"mmlu_{s}": {"acc,none": v[0], "acc_stderr,none": v[1]} for s, v in SUBJECTS.items()}
    with_group = lmeval04(1000, {**subjects, "mmlu": {"acc,none": 0.26, "acc_stderr,none": 0.02}}, date=1e9)
    assert parse_results_file(write_json(tmp_path / "a" / "results.json", with_group)).derived == ()
    subgroup = {"mmlu_stem": {"acc,none": 0.9, "acc_stderr,none": 0.01}}  # a group: not one of the 57 subjects
    without = parse_results_file(
        write_json(tmp_path / "b" / "results.json", lmeval04(1000, {**subjects, **subgroup}, date=1e9))
    )
    [derived] = without.derived
    assert derived.row.value == pytest.approx(sum(v[0] for v in SUBJECTS.values()) / 4, abs=1e-12)
    assert derived.note == "mean of 4 mmlu_* subjects" and derived.row.higher_is_better is True


def test_a_run_known_only_from_result_files_has_a_loss_for_windows(tmp_path: Path, db: Path) -> None:
    sweep = pythia_sweep(tmp_path / "sweep", steps=(1000, 2000, 3000, 4000, 5000, 6000))
    assert cli("import-evals", str(sweep), "--run", "p70", "--db", str(db))[0] == 0
    code, out, err = cli("windows", "--run", "p70", "--score", "piqa/acc,none", "--format", "json", "--db", str(db))
    assert (code, err) == (0, "")  # before: "these runs have no loss"
    assert isinstance(json.loads(out), list)
