"""Benchmarks (pytest-benchmark suites) and head-to-head comparison runners."""
