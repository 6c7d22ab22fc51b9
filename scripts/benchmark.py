#!/usr/bin/env python
"""`pcaa-benchmark`, run from a checkout: the command is `pcaa_hf.cli.benchmark.main`."""
import sys

# This folder's evaluate.py (`pcaa-evaluate`) would shadow the `evaluate` package that the metric section loads.
sys.path.pop(0)

from pcaa_hf.cli.benchmark import main

if __name__ == "__main__":
    raise SystemExit(main())
