"""Benchmarks: the model micro-benchmark, telemetry, energy and cost, history, load tests."""
