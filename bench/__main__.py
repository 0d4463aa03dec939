"""Run every benchmark: ``python -m bench``."""

from __future__ import annotations

from bench import eval_sweep, hvp, load, pathways, ray_sweep, render, store_write

if __name__ == "__main__":
    hvp.main([])
    eval_sweep.main([])
    pathways.main([])
    render.main([])
    store_write.main([])
    load.main([])
    ray_sweep.main([])
