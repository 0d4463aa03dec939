"""The job queue and its runner: the single writer of computed results."""

from __future__ import annotations

from analysis.jobs.runner import JobReport, next_job, run_job, serve, submit
from analysis.jobs.spec import HELDOUT, PROXY, Item, JobSpec, plan_items

__all__ = ["HELDOUT", "PROXY", "Item", "JobReport", "JobSpec", "next_job", "plan_items", "run_job", "serve", "submit"]
