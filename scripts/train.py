#!/usr/bin/env python
"""`pcaa-train`, run from a checkout: the command is `pcaa_hf.cli.train.main`."""

from pcaa_hf.cli.train import main

if __name__ == "__main__":
    raise SystemExit(main())
