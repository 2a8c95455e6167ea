"""Benchmark: see kvengine/benchmarks/fwht.py (also `kvengine bench fwht`)."""
from kvengine.benchmarks.fwht import main

if __name__ == "__main__":
    main()
