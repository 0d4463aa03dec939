"""The same job on the local executor and on Ray (a local Ray instance): wall time and overhead per unit.

Each repeat evaluates every checkpoint into a fresh cache, once per arm: the local executor,
Ray with one task per checkpoint (``split="checkpoint"``) and Ray with one task per metric
group (``split="group"``: here the tasks, the Hessian trace and the top eigenvalue of a
checkpoint run apart). Ray is started once, before the timings (its start-up is printed on its
own line); the Ray arms include shipping the spec, scheduling and the results' return to the
single writer.

    python -m bench.ray_sweep [--checkpoints 4] [--tasks sequence_ll] [--metrics hessian_trace,hessian_top_eigenvalue]
                              [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from bench.common import report
from bench.eval_sweep import make_checkpoints


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoints", type=int, default=4)
    parser.add_argument("--tasks", default="sequence_ll")
    parser.add_argument("--metrics", default="hessian_trace,hessian_top_eigenvalue")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    import ray

    from analysis.jobs import JobSpec, run_job, submit
    from analysis.jobs.ray_executor import run_job_ray
    from analysis.runs.load import load_run
    from analysis.store import Store

    metrics = tuple(m for m in args.metrics.split(",") if m)
    spec = JobSpec(run="run", tasks=tuple(args.tasks.split(",")), metrics=metrics)
    arms = {
        "local": run_job,
        "ray-checkpoint": lambda store, job: run_job_ray(store, job, split="checkpoint"),
        "ray-group": lambda store, job: run_job_ray(store, job, split="group"),
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        run_dir = make_checkpoints(root, args.checkpoints)
        start = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        print(f"ray start-up: {time.perf_counter() - start:.2f} s (once, not in the timings below)")
        times: dict[str, list[float]] = {arm: [] for arm in arms}
        try:
            for i in range(args.repeats):
                for arm, execute in arms.items():
                    store = Store(root / f"{arm}-{i}.duckdb")
                    store.register_run(load_run(run_dir))
                    job = submit(store, spec)
                    start = time.perf_counter()
                    done = execute(store, job)
                    times[arm].append(time.perf_counter() - start)
                    assert not done.failed, done.failed
        finally:
            ray.shutdown()
    local = statistics.median(times["local"])
    what = f"{args.checkpoints} checkpoints x ({len(spec.tasks)} tasks + {len(metrics)} metrics)"
    what += f", median of {args.repeats}"
    for arm in ("ray-checkpoint", "ray-group"):
        remote = statistics.median(times[arm])
        report(f"{arm} vs local", remote, local, what + "; baseline = local")
        per_unit = (remote - local) / args.checkpoints
        print(f"{arm} overhead per unit: {per_unit:+.3f} s (negative: Ray's parallelism won)")
    print("all timings: " + ", ".join(f"{arm} {[round(t, 2) for t in ts]}" for arm, ts in times.items()))


if __name__ == "__main__":
    main()
