"""Benchmarks: python -m disagg.bench.offline, python -m disagg.bench.serving."""
