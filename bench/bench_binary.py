"""Benchmark: see kvengine/benchmarks/binary.py (also `kvengine bench binary`)."""
from kvengine.benchmarks.binary import main

if __name__ == "__main__":
    main()
