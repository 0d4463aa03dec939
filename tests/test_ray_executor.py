"""The Ray executor on local Ray with the tiny OLMoE checkpoints of tests/test_jobs.py: same values, same statuses."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pandas as pd
import pytest

from analysis.jobs import run_job, submit
from analysis.jobs.ray_executor import run_job_ray
from analysis.runs.load import load_run
from analysis.store import Store
from tests.test_job_kinds import param_norm  # noqa: F401  (a fixture)
from tests.test_jobs import run_dir, spec  # noqa: F401  (run_dir is a fixture)

# Slow: starts Ray and computes on tiny checkpoints (`make test-fast` leaves it out).
pytestmark = pytest.mark.slow

GROUPED = ("hessian_trace", "pathway_distance", "routing_entropy")


def test_a_checkpoint_splits_into_evaluations_routing_and_one_group_per_other_metric(run_dir: Path) -> None:  # noqa: F811
    from analysis.jobs.ray_executor import metric_groups
    from analysis.jobs.spec import plan_items

    items = plan_items(spec(run_dir, metrics=("heldout_loss", "hessian_trace", "pathway_distance", "routing_entropy",
                                              "fisher_trace", "proxy")))  # fmt: skip
    groups = [[item.label for item in group] for group in metric_groups(items)]
    evaluations = [item.label for item in items if item.kind != "metric"]
    assert len(evaluations) >= 3  # the bundled tasks, held-out loss, proxies
    assert groups == [evaluations, ["hessian_trace"], ["pathway_distance", "routing_entropy"], ["fisher_trace"]]
    assert sum(map(len, groups)) == len(items)


@pytest.fixture(scope="module", autouse=True)
def ray_local():
    """One local Ray instance for the module (start-up is ~10 s); run_job_ray leaves one it did not start running."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _table(path: Path, table: str, key: str) -> pd.DataFrame:
    con = duckdb.connect(str(path), read_only=True)
    try:
        return con.execute(f"SELECT * EXCLUDE (created_at) FROM {table} ORDER BY {key}").df()
    except duckdb.BinderException:
        return con.execute(f"SELECT * FROM {table} ORDER BY {key}").df()
    finally:
        con.close()


def test_ray_stores_exactly_what_the_local_executor_stores(tmp_path: Path, run_dir: Path) -> None:  # noqa: F811
    local, remote = Store(tmp_path / "local.duckdb"), Store(tmp_path / "ray.duckdb")
    for store in (local, remote):
        store.register_run(load_run(run_dir))
    # Three metric groups per checkpoint (evaluations, routing, the Hessian trace), each its own Ray task.
    request = spec(run_dir, steps=(10, 20, 40), metrics=("heldout_loss", "proxy", *GROUPED))
    want = run_job(local, submit(local, request))
    # One unit already done before Ray starts: the Ray run reports it cached and computes only the others.
    first = submit(remote, spec(run_dir, steps=(10,), metrics=("heldout_loss", "proxy", *GROUPED)))
    run_job(remote, first)
    job = submit(remote, request)
    seen: list[tuple[int, int, str]] = []
    got = run_job_ray(remote, job, split="group", progress=lambda u, n, name, *_: seen.append((u, n, name)))
    assert not got.failed and not want.failed and got.computed > 0
    assert got.computed + got.cached == want.computed + want.cached
    assert sorted(name for _, _, name in seen) == ["20", "40"] and seen[-1][:2] == (3, 3)
    for table, key in (
        ("results", "run, step, metric, params_hash"),
        ("sample_results", "run, step, metric, params_hash, sample_id"),
    ):
        ours, theirs = _table(local.path, table, key), _table(remote.path, table, key)
        assert len(ours) > 0
        # Every key, parameter and version is identical. Values too, to float32 rounding: a Ray task runs torch
        # with one thread (Ray sets OMP_NUM_THREADS=1), so Hessian-vector sums may be added in another order.
        numbers = [c for c in ("value", "stderr") if c in ours]
        pd.testing.assert_frame_equal(ours.drop(columns=numbers), theirs.drop(columns=numbers), check_exact=True)
        pd.testing.assert_frame_equal(ours[numbers], theirs[numbers], check_exact=False, rtol=1e-5, atol=0, obj=table)
    units = remote.job_units(job)
    assert list(units["status"]) == ["done"] * 3 and units["message"].str.contains("ray|cached").all()
    assert remote.jobs().set_index("id").loc[job, "status"] == "done"


def test_a_checkpoint_that_fails_on_ray_marks_only_its_unit_failed(tmp_path: Path, run_dir: Path, caplog) -> None:  # noqa: F811
    import logging
    import shutil

    from analysis.runs.base import Run

    broken = tmp_path / "tiny"
    shutil.copytree(run_dir, broken)
    store = Store(tmp_path / "cache.duckdb")
    run = load_run(broken)
    store.register_run(Run("tiny", run.source, run.checkpoints, run.log))
    for weights in (broken / "step_20").glob("*.safetensors"):
        weights.write_bytes(b"garbage")  # after registration: the fingerprint no longer matters here
    with caplog.at_level(logging.INFO, logger="analysis"):
        report = run_job_ray(store, submit(store, spec(run_dir, steps=(10, 20), tasks=())))
    units = store.job_units(report.job_id).set_index("unit")
    assert units.loc["10", "status"] == "done" and units.loc["20", "status"] == "failed"
    assert len(report.failed) == 1 and report.failed[0].startswith("step 20")
    assert set(store.results("tiny")["step"]) == {10}
    # The executor logs each unit's way through Ray and the failure with its reason, at their levels.
    job = report.job_id
    logged = [(r.levelname, r.getMessage()) for r in caplog.records if r.name.startswith("analysis.jobs")]
    assert ("INFO", f"job {job} step 10: sent to Ray as 1 task(s)") in logged
    [failure] = [m for level, m in logged if level == "WARNING"]
    assert failure.startswith(f"job {job} step 20: failed: ") and units.loc["20", "message"] in failure


def test_auto_split_by_group_only_while_workers_would_idle_and_a_gpu_request_without_gpus_queues_nothing(
    tmp_path: Path,
    run_dir: Path,  # noqa: F811
    monkeypatch,
) -> None:
    import analysis.jobs.ray_executor as rx

    assert rx.worker_slots() == 2 and rx.worker_slots(0.5) == 0  # the module's local Ray: 2 CPUs, no GPU
    store = Store(tmp_path / "cache.duckdb")
    store.register_run(load_run(run_dir))
    request = spec(run_dir, tasks=(), metrics=("heldout_loss", "hessian_trace"))
    groups_sent: list[int] = []
    real = rx.metric_groups
    monkeypatch.setattr(rx, "metric_groups", lambda todo: groups_sent.append(1) or real(todo))
    one = run_job_ray(store, submit(store, spec(run_dir, steps=(10,), tasks=(), metrics=request.metrics)))
    assert not one.failed and len(groups_sent) == 1  # 1 checkpoint < 2 slots: split by group
    two = run_job_ray(store, submit(store, spec(run_dir, steps=(20, 40), tasks=(), metrics=request.metrics)))
    assert not two.failed and len(groups_sent) == 1  # 2 checkpoints fill 2 slots: one task each
    job = submit(store, request)
    with pytest.raises(ValueError, match="has 0 GPUs, too few for 1 per task; lower --ray-gpus-per-unit"):
        run_job_ray(store, job, num_gpus_per_unit=1)
    with pytest.raises(ValueError, match="split 'metric': use one of auto, group, checkpoint"):
        run_job_ray(store, job, split="metric")
    assert store.jobs().set_index("id").loc[job, "status"] == "queued"
    assert set(store.job_units(job)["status"]) == {"queued"}


def test_a_metric_group_that_fails_whole_keeps_the_others_rows_and_a_rerun_computes_only_it(
    tmp_path: Path,
    run_dir: Path,  # noqa: F811
) -> None:
    import shutil

    from analysis.runs.base import Run

    store = Store(tmp_path / "cache.duckdb")
    copy = tmp_path / "tiny"
    shutil.copytree(run_dir, copy)
    shutil.copy(run_dir.parent / "probe.jsonl", tmp_path / "probe.jsonl")
    run = load_run(copy)
    store.register_run(Run("tiny", run.source, run.checkpoints, run.log))
    # Two groups per checkpoint: the lm-eval tasks (no probe data) and the Hessian trace (reads the probe file).
    request = spec(copy, steps=(10, 20), metrics=("hessian_trace",))
    job = submit(store, request)
    probe = tmp_path / "probe.jsonl"
    good = probe.read_bytes()
    probe.write_text("{not json\n")  # broken after queueing: every Hessian task fails before computing anything
    report = run_job_ray(store, job, split="group")
    units = store.job_units(job).set_index("unit")
    assert list(units["status"]) == ["failed", "failed"]
    assert units["message"].str.startswith("hessian_trace: ").all()
    stored = store.results("tiny")
    assert len(stored) and not (stored["metric"] == "hessian_trace").any()  # the task scores are kept
    kept = len(stored)
    assert report.computed > 0 and len(report.failed) == 2
    probe.write_bytes(good)
    again = run_job_ray(store, job, split="group")  # the failed units run again, for just the missing item
    assert not again.failed and again.computed == 2
    assert list(store.job_units(job)["status"]) == ["done", "done"]
    after = store.results("tiny")
    assert (after["metric"] == "hessian_trace").sum() == 2 and len(after) == kept + 2


def test_sigkill_of_a_ray_task_mid_unit_leaves_nothing_of_it_and_resume_finishes(tmp_path: Path, run_dir: Path):  # noqa: F811
    import os
    import signal
    import subprocess
    import threading
    import time

    store = Store(tmp_path / "cache.duckdb")
    store.register_run(load_run(run_dir))
    slow = spec(
        run_dir, steps=(10, 20), tasks=(), metrics=("hessian_trace",),
        metric_params={"hessian_trace": {"n_probes": "400"}},
    )  # fmt: skip
    job = submit(store, slow)
    killed: list[int] = []

    def kill_one_task() -> None:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not killed:
            found = subprocess.run(["pgrep", "-f", "ray::compute_unit"], capture_output=True, text=True).stdout.split()
            if found:
                time.sleep(0.5)  # mid-unit: the task has started computing
                os.kill(int(found[0]), signal.SIGKILL)
                killed.append(int(found[0]))
            time.sleep(0.1)

    killer = threading.Thread(target=kill_one_task)
    killer.start()
    report = run_job_ray(store, job)
    killer.join()
    assert killed, "no Ray task process was seen to kill"
    units = store.job_units(job).set_index("unit")
    failed = units[units["status"] == "failed"]
    assert len(failed) == 1 and failed["message"].str.contains("Ray task failed").all()
    assert len(report.failed) == 1
    done = {int(u) for u in units[units["status"] == "done"].index}
    assert set(store.results("tiny")["step"]) == done  # nothing of the killed unit is visible
    # Resume: the same job again computes just the killed unit.
    again = run_job_ray(store, job)
    assert not again.failed and again.computed == 1 and again.cached == len(done)
    assert set(store.results("tiny")["step"]) == {10, 20}
    assert list(store.job_units(job)["status"]) == ["done", "done"]


def _compute_unit_pids() -> list[int]:
    import subprocess

    found = subprocess.run(["pgrep", "-f", "ray::compute_unit"], capture_output=True, text=True).stdout.split()
    return [int(pid) for pid in found]


def test_cancelling_a_ray_job_stops_its_tasks_and_keeps_nothing_partial(tmp_path: Path, run_dir: Path):  # noqa: F811
    import threading
    import time

    store = Store(tmp_path / "cache.duckdb")
    store.register_run(load_run(run_dir))
    slow = spec(
        run_dir, steps=(10, 20, 40), tasks=(), metrics=("hessian_trace",),
        metric_params={"hessian_trace": {"n_probes": "1000"}},  # long enough to be cancelled mid-unit
    )  # fmt: skip
    job = submit(store, slow)

    def cancel_once_a_task_runs() -> None:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not _compute_unit_pids():
            time.sleep(0.1)
        store.set_job(job, "cancelled", "cancelled from the dashboard")  # what the Jobs page's button does

    canceller = threading.Thread(target=cancel_once_a_task_runs)
    canceller.start()
    started = time.monotonic()
    report = run_job_ray(store, job)
    canceller.join()
    assert report.cancelled and time.monotonic() - started < 120
    assert store.jobs().set_index("id").loc[job, "status"] == "cancelled"
    units = store.job_units(job).set_index("unit")
    unfinished = units[units["status"] != "done"]
    assert len(unfinished) >= 1 and (unfinished["status"] == "queued").all()
    assert (unfinished["message"] == "interrupted").all()
    done = {int(u) for u in units[units["status"] == "done"].index}
    assert set(store.results("tiny").get("step", [])) == done  # a cancelled unit left no rows
    deadline = time.monotonic() + 30
    while _compute_unit_pids() and time.monotonic() < deadline:  # force-cancelled tasks' processes are killed
        time.sleep(0.2)
    assert not _compute_unit_pids(), "a cancelled Ray task is still computing"
    # A cancelled job stays cancelled; the same request queued again computes only what the cancel interrupted.
    again = run_job_ray(store, submit(store, slow))
    assert not again.cancelled and not again.failed
    assert again.computed == len(unfinished) and again.cached == len(done)
    assert list(store.job_units(again.job_id)["status"]) == ["done"] * 3
    assert store.jobs().set_index("id").loc[job, "status"] == "cancelled"


def test_a_kind_registered_only_in_this_process_runs_on_ray_as_it_does_locally(
    tmp_path: Path,
    run_dir: Path,  # noqa: F811
    param_norm,  # noqa: F811
) -> None:
    from tests.test_job_kinds import direct_norm

    local, remote = Store(tmp_path / "local.duckdb"), Store(tmp_path / "ray.duckdb")
    request = spec(run_dir, steps=(10,), tasks=(), metrics=("param_norm",))
    for store in (local, remote):
        store.register_run(load_run(run_dir))
    assert not run_job(local, submit(local, request)).failed
    # The Ray worker never imported the kind's registration: the driver ships it with the unit.
    got = run_job_ray(remote, submit(remote, request), split="group")
    assert not got.failed and got.computed == 1
    ours, theirs = local.results("tiny"), remote.results("tiny")
    assert list(theirs["metric"]) == list(ours["metric"]) == ["param_norm"]
    assert theirs["value"].iloc[0] == pytest.approx(ours["value"].iloc[0], rel=1e-12)
    assert theirs["value"].iloc[0] == pytest.approx(direct_norm(run_dir / "step_10"), rel=1e-9)
