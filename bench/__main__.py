"""Run every benchmark: ``python -m bench``."""

from __future__ import annotations

from bench import (
    calibration,
    coverage,
    eval_sweep,
    hvp,
    job_queries,
    load,
    mc_scoring,
    pathways,
    ray_sweep,
    render,
    store_write,
)

if __name__ == "__main__":
    calibration.main([])
    coverage.main([])
    hvp.main([])
    eval_sweep.main([])
    mc_scoring.main([])
    pathways.main([])
    render.main([])
    store_write.main([])
    job_queries.main([])
    load.main([])
    ray_sweep.main([])
