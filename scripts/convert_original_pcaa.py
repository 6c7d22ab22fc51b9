#!/usr/bin/env python
"""`pcaa-convert-original`, run from a checkout: the command is `pcaa_hf.cli.convert_original.main`."""

from pcaa_hf.cli.convert_original import main

if __name__ == "__main__":
    raise SystemExit(main())
