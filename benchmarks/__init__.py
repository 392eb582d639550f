"""Reproducible benchmark scripts (run as `python -m benchmarks.<name>`); results in benchmarks/results/."""
