"""Speed, memory and learning benchmarks; run each as ``python -m bench.NAME`` from the repository root."""
