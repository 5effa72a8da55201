"""The package is type-checked as part of the test run (mypy, configured in pyproject.toml's [tool.mypy]),
so CI keeps the declared interfaces (Dictionary, ActivationStream, the config dataclasses) honest.

mypy's cache (.mypy_cache, gitignored) makes a re-run take a few seconds; a cold run takes about 30."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_mypy_finds_nothing():
    done = subprocess.run([sys.executable, "-m", "mypy"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
