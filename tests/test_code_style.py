"""The code is clean under the project's ruff configuration (pyproject.toml), so CI checks it with the tests."""

import subprocess
import sys
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing():
    # ruff is in the test extra; `python -m ruff` finds the one installed beside this interpreter.
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", str(REPOSITORY)], capture_output=True,
                            text=True, cwd=REPOSITORY, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
