"""Benchmarks: python -m disagg.common.bench.offline, python -m disagg.common.bench.serving."""
