"""Benchmarks: each prints JSON with its baselines measured in the same run."""
