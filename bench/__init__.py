"""Benchmark harness behind `make bench`: one run measures the limit and the service against it."""
