#!/usr/bin/env bash
# Create .venv and install pcaa_hf with its test extra. torch is pinned to the CPU build kept on this machine's disk;
# on other machines the same pin (or any torch >= 2.4 you install first) works.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[test]"
