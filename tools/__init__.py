"""Development tools shared by the tests and the benchmark harness (not imported by the service)."""
