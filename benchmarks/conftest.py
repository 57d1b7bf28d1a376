"""Benchmarks: speed is measured as a ratio against a baseline run in the same process.

Run with ``python -m pytest benchmarks --benchmark-enable`` (CI does not run them). Each
benchmark prints a table and records its figures in ``benchmark.extra_info``.
"""
