"""Load tests and benchmarks: `make load`, `make bench`."""
