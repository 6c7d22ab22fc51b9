#!/usr/bin/env python
"""`pcaa-export`, run from a checkout: the command is `pcaa_hf.cli.export.main`."""

from pcaa_hf.cli.export import main

if __name__ == "__main__":
    raise SystemExit(main())
