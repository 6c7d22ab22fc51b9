#!/usr/bin/env python
"""`pcaa-predict`, run from a checkout: the command is `pcaa_hf.cli.predict.main`."""

from pcaa_hf.cli.predict import main

if __name__ == "__main__":
    raise SystemExit(main())
