#!/usr/bin/env python
"""`pcaa-make-synthetic-cityscapes`, run from a checkout: the command is `pcaa_hf.cli.make_synthetic.cityscapes`."""

from pcaa_hf.cli.make_synthetic import cityscapes

if __name__ == "__main__":
    raise SystemExit(cityscapes())
