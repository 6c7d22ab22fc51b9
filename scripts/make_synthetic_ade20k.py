#!/usr/bin/env python
"""`pcaa-make-synthetic-ade20k`, run from a checkout: the command is `pcaa_hf.cli.make_synthetic.ade20k`."""

from pcaa_hf.cli.make_synthetic import ade20k

if __name__ == "__main__":
    raise SystemExit(ade20k())
