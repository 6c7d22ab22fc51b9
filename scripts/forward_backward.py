#!/usr/bin/env python
"""`pcaa-forward-backward`, run from a checkout: the command is `pcaa_hf.cli.forward_backward.main`."""

from pcaa_hf.cli.forward_backward import main

if __name__ == "__main__":
    raise SystemExit(main())
