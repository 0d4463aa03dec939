"""Benchmarks: each prints the project's time against a baseline measured in the same run, as a ratio."""
