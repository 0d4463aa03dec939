"""The same job on the local executor and on Ray (a local Ray instance): wall time and overhead per unit.

Each repeat evaluates every checkpoint into a fresh cache, once per executor. Ray is started
once, before the timings (its start-up is printed on its own line); the Ray arm includes
shipping the spec, the tasks' scheduling and the results' return to the single writer.

    python -m bench.ray_sweep [--checkpoints 4] [--tasks sequence_ll] [--repeats 3]
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
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    import ray

    from analysis.jobs import JobSpec, run_job, submit
    from analysis.jobs.ray_executor import run_job_ray
    from analysis.runs.load import load_run
    from analysis.store import Store

    spec = JobSpec(run="run", tasks=tuple(args.tasks.split(",")))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        run_dir = make_checkpoints(root, args.checkpoints)
        start = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        print(f"ray start-up: {time.perf_counter() - start:.2f} s (once, not in the timings below)")
        times: dict[str, list[float]] = {"local": [], "ray": []}
        try:
            for i in range(args.repeats):
                for arm, execute in (("local", run_job), ("ray", run_job_ray)):
                    store = Store(root / f"{arm}-{i}.duckdb")
                    store.register_run(load_run(run_dir))
                    job = submit(store, spec)
                    start = time.perf_counter()
                    done = execute(store, job)
                    times[arm].append(time.perf_counter() - start)
                    assert not done.failed, done.failed
        finally:
            ray.shutdown()
    local, remote = statistics.median(times["local"]), statistics.median(times["ray"])
    what = f"{args.checkpoints} checkpoints x {len(spec.tasks)} tasks, median of {args.repeats}; baseline = local"
    report("ray executor vs local", remote, local, what)
    print(f"ray overhead per unit: {(remote - local) / args.checkpoints:+.3f} s (negative: Ray's parallelism won)")
    print(f"all timings: local {[round(t, 2) for t in times['local']]}, ray {[round(t, 2) for t in times['ray']]}")


if __name__ == "__main__":
    main()
