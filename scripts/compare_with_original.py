#!/usr/bin/env python
"""`pcaa-compare-with-original`, run from a checkout: the command is `pcaa_hf.cli.compare_with_original.main`."""

from pcaa_hf.cli.compare_with_original import main

if __name__ == "__main__":
    raise SystemExit(main())
