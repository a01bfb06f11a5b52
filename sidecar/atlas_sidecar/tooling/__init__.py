"""Development tooling: benchmarks, peers, prompt streams, load tests, workloads."""
