#!/usr/bin/env python
"""`pcaa-convert-backbone`, run from a checkout: the command is `pcaa_hf.cli.convert_backbone.main`."""

from pcaa_hf.cli.convert_backbone import main

if __name__ == "__main__":
    raise SystemExit(main())
