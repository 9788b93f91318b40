"""clipedge's benchmarks: each module runs as `python -m benchmarks.<name>` from the repository
root (docs/benchmarks.md says what each one measures and holds the results)."""
