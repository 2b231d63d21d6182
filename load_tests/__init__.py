"""Load tests and benchmarks: Locust traffic, fault and soak runs, micro-benchmarks."""
