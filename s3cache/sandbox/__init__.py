"""Embedded real S3 servers and relays for the demo, the tests and the benchmarks."""
