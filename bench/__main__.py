"""Run every benchmark: ``python -m bench``."""

from __future__ import annotations

from bench import eval_sweep, hvp, load, pathways

if __name__ == "__main__":
    hvp.main([])
    eval_sweep.main([])
    pathways.main([])
    load.main([])
