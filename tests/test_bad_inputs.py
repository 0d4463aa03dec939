"""A corpus of broken inputs driven through the real command line.

Each case builds real files (a truncated safetensors, a pickle that would run code, logs with NaN,
result files from other tools, ...) in a folder whose name has spaces and unicode, runs one command,
and checks the contract: a non-zero exit with one line on stderr that names the file and the fix,
and a cache file that is byte-for-byte the same table contents as before; or, where the input is
usable, the documented handling (NaN dropped with one warning line, the last of a repeated step kept).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import pytest
import torch

from analysis.__main__ import main
from analysis.store import Store
from tests.factories import save_tiny_checkpoint

TABLES = ("meta", "runs", "checkpoints", "log_series", "results", "sample_results", "jobs", "job_units")


def cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def snapshot(db: Path) -> dict[str, list[tuple]]:
    """Every row of every table (the write generation in ``meta`` included): equal means nothing was written."""
    con = duckdb.connect(str(db), read_only=True)
    try:
        return {table: con.execute(f"SELECT * FROM {table} ORDER BY ALL").fetchall() for table in TABLES}
    finally:
        con.close()


class Payload:
    """Unpickling this runs ``touch MARKER``: what a malicious pytorch_model.bin does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


@dataclass
class Case:
    """``build(folder, good_checkpoint) -> argv`` after the command name; what must be on stderr."""

    command: str
    build: Callable[[Path, Path], list[str]]
    stderr: tuple[str, ...]  # substrings of the one error line (besides the file it names)
    names: str = ""  # the file or folder the line must name, relative to the case folder
    extra: dict = field(default_factory=dict)


def _copy(good: Path, dest: Path) -> Path:
    return Path(shutil.copytree(good, dest))


def truncated_safetensors(d: Path, good: Path) -> list[str]:
    ckpt = _copy(good, d / "run" / "step_10")
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    return [str(d / "run")]


def config_not_json(d: Path, good: Path) -> list[str]:
    ckpt = _copy(good, d / "run" / "step_10")
    (ckpt / "config.json").write_text('{"model_type": "olmoe", "hidden_size": 32,')  # cut mid-write
    return [str(d / "run")]


def evil_bin(d: Path, good: Path, *, zipped: bool) -> Path:
    """A checkpoint whose weights are a pickle that would create ``d/PWNED`` if it were ever unpickled."""
    ckpt = _copy(good, d / "run" / "step_10")
    (ckpt / "model.safetensors").unlink()
    state = {"model.embed_tokens.weight": torch.zeros(2, 2), "extra": Payload(d / "PWNED")}
    if zipped:
        torch.save(state, ckpt / "pytorch_model.bin")  # what a tampered torch.save output looks like
    else:
        with (ckpt / "pytorch_model.bin").open("wb") as handle:
            pickle.dump(state, handle)  # the legacy, plain-pickle format
    return ckpt


def missing_tokenizer(d: Path, good: Path) -> list[str]:
    ckpt = _copy(good, d / "run" / "step_10")
    for file in ckpt.iterdir():
        if file.name.startswith("tokenizer"):
            file.unlink()
    return ["heldout_loss", "--checkpoint", str(ckpt), "--data", str(probe_file(d))]


def probe_file(d: Path) -> Path:
    path = d / "probe.jsonl"
    path.write_text("".join(json.dumps({"text": f"{a} + {a % 5} = {a + a % 5}"}) + "\n" for a in range(8)))
    return path


def huge_step_folder(d: Path, good: Path) -> list[str]:
    _copy(good, d / "run" / f"step_{10**20}")
    return [str(d / "run")]


def results_file(name: str, content: object) -> Callable[[Path, Path], list[str]]:
    def build(d: Path, good: Path) -> list[str]:
        path = d / name
        path.write_text(content if isinstance(content, str) else json.dumps(content))
        return [str(path), "--run", "alpha"]

    return build


def one_bad_file_in_a_folder(d: Path, good: Path) -> list[str]:
    folder = d / "lm eval ü"
    folder.mkdir()
    good_results = {"results": {"piqa": {"acc,none": 0.7}}, "config": {"model_args": "revision=step10"}}
    (folder / "a_results.json").write_text(json.dumps(good_results))
    (folder / "b_results.json").write_text('{"results": {"piqa": {"acc,none": 0.')  # cut mid-write
    return [str(folder), "--run", "alpha"]


OPENCOMPASS = {"accuracy": 45.2, "details": {"0": {"prompt": "Q: 1+1", "pred": ["2"], "correct": True}}}
HELM = [{"name": {"name": "exact_match", "split": "test"}, "count": 1, "sum": 0.5, "mean": 0.5}]
FLAT = {"results": {"arc_easy": 0.51}, "config": {"model_args": "revision=step10"}}
HUGE_NUMBER = '{"results": {"piqa": {"acc": 1' + "0" * 400 + '}}, "config": {"model_args": "revision=step10"}}'
HUGE_STEP = {"results": {"piqa": {"acc,none": 0.7}}, "config": {"model_args": "revision=step" + "9" * 30}}
DEEP = '{"results": ' + "[" * 100_000 + "]" * 100_000 + "}"

CASES = {
    "truncated safetensors": Case("add-run", truncated_safetensors, ("truncated", "save it again"), "run/step_10"),
    "config.json not JSON": Case("add-run", config_not_json, ("not valid JSON", "save_pretrained"), "run/step_10"),
    "pickle payload (torch.save zip)": Case(
        "add-run",
        lambda d, g: [str(evil_bin(d, g, zipped=True).parent)],
        ("refused", "would call", "system", "safetensors"),
        "run/step_10",
    ),
    "pickle payload (plain pickle)": Case(
        "add-run",
        lambda d, g: [str(evil_bin(d, g, zipped=False).parent)],
        ("refused", "safetensors"),
        "run/step_10",
    ),
    "pickle payload loaded directly": Case(
        "metric",
        lambda d, g: ["heldout_loss", "--checkpoint", str(evil_bin(d, g, zipped=True)), "--data", str(probe_file(d))],
        ("refused", "safetensors"),
        "run/step_10/pytorch_model.bin",
    ),
    "tokenizer missing": Case("metric", missing_tokenizer, ("no tokenizer files", "save_pretrained"), "run/step_10"),
    "step above 2**53 in a folder name": Case("add-run", huge_step_folder, ("above 2**53", "rename"), "run"),
    "results from another tool (random JSON)": Case(
        "import-evals", results_file("random.json", {"hello": [1, 2, 3]}), ("no 'results' object",), "random.json"
    ),
    "results from another tool (OpenCompass-like)": Case(
        "import-evals", results_file("opencompass.json", OPENCOMPASS), ("no 'results' object",), "opencompass.json"
    ),
    "results from another tool (HELM-like list)": Case(
        "import-evals", results_file("helm stats.json", HELM), ("no 'results' object",), "helm stats.json"
    ),
    "results without per-metric objects": Case(
        "import-evals", results_file("flat.json", FLAT), ("no numeric metric values",), "flat.json"
    ),
    "results with a number too big for a float": Case(
        "import-evals", results_file("big.json", HUGE_NUMBER), ("no numeric metric values",), "big.json"
    ),
    "results with a step above 2**53": Case(
        "import-evals", results_file("huge_step.json", HUGE_STEP), ("2**53", "pass the real step"), "huge_step.json"
    ),
    "results nested too deeply": Case(
        "import-evals", results_file("deep.json", DEEP), ("nested too deeply",), "deep.json"
    ),
    "results file cut mid-write": Case(
        "import-evals", results_file("cut ✂.json", '{"results": {"piqa": {"acc,'), ("not valid JSON",), "cut ✂.json"
    ),
    "one bad file in a results folder": Case(
        "import-evals", one_bad_file_in_a_folder, ("not valid JSON",), "lm eval ü/b_results.json"
    ),
    # Unknown task *names* ("did you mean") are checked at queueing in test_jobs.py::test_bad_requests_queue_nothing;
    # through the CLI they cost a 6-40 s index of lm-eval's built-in tasks, so here a task YAML path that is not there.
    "unknown task file": Case(
        "eval", lambda d, g: ["--run", "alpha", "--tasks", str(d / "my task.yaml")], ("my task.yaml",), "my task.yaml"
    ),
}


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("good") / "step_10")


@pytest.fixture
def case_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "run ü 1 <b>"
    folder.mkdir()
    return folder


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_and_writes_nothing(
    name: str, case_dir: Path, good_checkpoint: Path, populated_db: Path
) -> None:
    case = CASES[name]
    argv = case.build(case_dir, good_checkpoint)
    before = snapshot(populated_db)
    code, _, err = cli(case.command, *argv, "--db", str(populated_db))
    assert code != 0, err
    assert err.startswith("error: ") and err.count("\n") == 1, err  # one line, no traceback, no warnings
    named = case_dir / case.names if case.names else None
    if named is not None:
        assert str(named) in err or str(named.resolve()) in err, err
    for text in case.stderr:
        assert text in err, err
    assert snapshot(populated_db) == before
    assert not (case_dir / "PWNED").exists(), "the pickle payload ran"


def test_a_pickle_payload_never_runs_in_a_worker_either(case_dir: Path, good_checkpoint: Path, tmp_path: Path) -> None:
    """Registered while it held safetensors, then swapped for a payload: the eval unit fails, nothing runs."""
    db = tmp_path / "c.duckdb"
    ckpt = _copy(good_checkpoint, case_dir / "run" / "step_10")
    assert cli("add-run", str(ckpt.parent), "--db", str(db))[0] == 0
    evil = evil_bin(case_dir / "evil", good_checkpoint, zipped=True)
    shutil.rmtree(ckpt)
    shutil.copytree(evil, ckpt)
    code, out, err = cli("eval", "--run", "run", "--metrics", "heldout_loss", "--data", str(probe_file(case_dir)),
                         "--db", str(db))  # fmt: skip
    assert code == 1 and "1 failed" in out
    [failure] = [line for line in err.splitlines() if line.startswith("failed:")]
    assert "pytorch_model.bin: refused" in failure and "safetensors" in failure
    assert "Traceback" not in err
    assert Store(db).results("run").empty
    assert not (case_dir / "evil" / "PWNED").exists()


# --------------------------------------------------------------------------- usable input, documented handling


def log_run(d: Path, good: Path, log_name: str, text: str) -> Path:
    run = d / "logged run ✓"
    _copy(good, run / "step_10")
    (run / log_name).write_text(text)
    return run


@pytest.mark.parametrize(
    ("log_name", "text", "expected", "warning"),
    [
        ("metrics.csv", "step,loss\n1,nan\n2,2.0\n3,inf\n4,-inf\n5,1.0\n", {2: 2.0, 5: 1.0},
         "dropped 3 NaN or infinite"),
        ("metrics.jsonl", '{"step": 1, "loss": NaN}\n{"step": 2, "loss": Infinity}\n{"step": 3, "loss": 0.5}\n',
         {3: 0.5}, "dropped 2 NaN or infinite"),
        ("metrics.jsonl", '{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.0}\n{"step": 1, "loss": 2.5}\n',
         {1: 2.5, 2: 2.0}, None),  # a resumed run logs step 1 again: the last value wins
        ("metrics.csv", "step,loss\n30,0.3\n10,0.1\n20,0.2\n", {10: 0.1, 20: 0.2, 30: 0.3}, None),
        ("metrics.csv", f"step,loss\n1,2.0\n{10**15},1.0\n", {1: 2.0, 10**15: 1.0}, None),
        ("metrics.jsonl", f'{{"step": 1, "loss": 2.0}}\n{{"step": {10**20}, "loss": 1.0}}\n', {1: 2.0},
         "skipped 1 values without a whole-number step up to 2**53"),
        ("metrics.jsonl", '{"step": 1, "loss": 2.0, "tokens": 1e30}\n', {1: 2.0}, None),
    ],
    ids=["nan-inf-csv", "nan-inf-jsonl", "duplicate-steps", "non-monotone", "step-1e15", "step-1e20", "tokens-1e30"],
)  # fmt: skip
def test_usable_logs_are_registered_as_documented(
    case_dir: Path, good_checkpoint: Path, db: Path, log_name: str, text: str, expected: dict, warning: str | None
) -> None:
    run = log_run(case_dir, good_checkpoint, log_name, text)
    code, out, err = cli("add-run", str(run), "--db", str(db))
    assert code == 0, err
    assert "registered run 'logged run ✓'" in out
    if warning is None:
        assert err == ""
    else:
        assert err.count("\n") == 1 and err.startswith(f"warning: {run.resolve() / log_name}: ") and warning in err
    series = Store(db).log_series("logged run ✓")
    assert dict(zip(series["step"].tolist(), series["value"].tolist(), strict=True)) == expected
    assert series["tokens"].isna().all() or series["tokens"].abs().max() <= 2**53


def test_results_of_a_task_nobody_knows_are_imported_under_its_own_name(case_dir: Path, populated_db: Path) -> None:
    path = case_dir / "results ü.json"
    data = {"results": {"my_private_task": {"acc,none": 0.25, "acc_stderr,none": 0.01}},
            "config": {"model_args": "pretrained=/m,revision=step10"}}  # fmt: skip
    path.write_text(json.dumps(data))
    code, out, err = cli("import-evals", str(path), "--run", "alpha", "--db", str(populated_db))
    assert (code, err) == (0, "") and "1 values" in out
    table = Store(populated_db).results("alpha")
    rows = table[["step", "metric", "value", "stderr"]].values.tolist()
    assert rows == [[10, "my_private_task/acc,none", 0.25, 0.01]]


def test_a_folder_of_results_is_imported_in_one_transaction(case_dir: Path, populated_db: Path) -> None:
    folder = case_dir / "evals"
    folder.mkdir()
    for step in (10, 77, 500):  # 10 is registered; 77 and 500 are checkpoints this machine never had
        data = {"results": {"piqa": {"acc,none": step / 1000, "acc_stderr,none": 0.01}},
                "config": {"model_args": f"pretrained=/m,revision=step{step}"}}  # fmt: skip
        (folder / f"step{step}.json").write_text(json.dumps(data))
    store = Store(populated_db)
    before = store.generation()
    code, out, err = cli("import-evals", str(folder), "--run", "alpha", "--db", str(populated_db))
    assert (code, err) == (0, "") and "imported 3 values" in out
    assert store.generation() == before + 1  # one commit: a kill midway would leave none of the three
    steps = store.checkpoints("alpha").set_index("step")
    assert steps.loc[77, "fingerprint"] == "imported:pretrained=/m,revision=step77"
    assert steps.loc[10, "fingerprint"] == "fp-alpha-10"  # a known checkpoint keeps its own fingerprint
    got = store.results("alpha", ["piqa/acc,none"])
    assert dict(zip(got["step"], got["value"], strict=True)) == {10: 0.01, 77: 0.077, 500: 0.5}


def test_unicode_run_folder_round_trips_through_the_cli(case_dir: Path, good_checkpoint: Path, db: Path) -> None:
    run = case_dir / "run ü 1"
    _copy(good_checkpoint, run / "step_10")
    (run / "train log ✓.csv").write_text("step,loss\n10,1.5\n")
    assert cli("add-run", str(run), "--db", str(db))[0] == 0
    code, out, _ = cli("query", "--run", "run ü 1", "--format", "json", "--db", str(db))
    assert code == 0
    assert json.loads(out) == [
        {
            "run": "run ü 1",
            "step": 10,
            "tokens": None,
            "metric": "train/loss",
            "value": 1.5,
            "stderr": None,
            "setting": "",
        }
    ]
    [path] = Store(db).checkpoints("run ü 1")["path"].tolist()
    assert path == str((run / "step_10").resolve())
