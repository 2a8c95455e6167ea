"""Benchmark: see kvengine/benchmarks/attention.py (also `kvengine bench attention`)."""
from kvengine.benchmarks.attention import main

if __name__ == "__main__":
    main()
