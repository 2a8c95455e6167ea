"""Benchmark: see kvengine/benchmarks/decode.py (also `kvengine bench decode`)."""
from kvengine.benchmarks.decode import main

if __name__ == "__main__":
    main()
