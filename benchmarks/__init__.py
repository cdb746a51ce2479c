"""llmmo's benchmarks: `make bench` (python -m benchmarks.run) writes benchmarks/results/bench.json and a table."""
