#!/usr/bin/env python
"""`pcaa-main-job`, run from a checkout: the command is `pcaa_hf.cli.main_job.main`."""

from pcaa_hf.cli.main_job import main

if __name__ == "__main__":
    raise SystemExit(main())
