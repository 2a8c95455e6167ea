"""Benchmark: see kvengine/benchmarks/quant.py (also `kvengine bench quant`)."""
from kvengine.benchmarks.quant import main

if __name__ == "__main__":
    main()
