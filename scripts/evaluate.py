#!/usr/bin/env python
"""`pcaa-evaluate`, run from a checkout: the command is `pcaa_hf.cli.evaluate.main`."""

from pcaa_hf.cli.evaluate import main

if __name__ == "__main__":
    raise SystemExit(main())
