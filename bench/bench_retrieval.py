"""Benchmark: see kvengine/benchmarks/retrieval.py (also `kvengine bench retrieval`)."""
from kvengine.benchmarks.retrieval import main

if __name__ == "__main__":
    main()
