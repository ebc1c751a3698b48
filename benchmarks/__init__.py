"""pcq benchmarks: ``python -m benchmarks.run --help``; see benchmarks/README.md."""
