"""The tree is clean under ruff (ruff.toml: pyflakes, pycodestyle at 120 columns, sorted imports).

scripts/test.sh runs the same check before the suite; this test keeps `pytest` alone honest too.
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.skipif(importlib.util.find_spec("ruff") is None,
                    reason="ruff is not installed (it comes with the test extra: pip install -e '.[test]')")
def test_ruff_check_passes():
    cmd = [sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", "."]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (
        f"ruff found style problems (run `ruff check --fix .`, wrap long lines by hand):\n{proc.stdout}{proc.stderr}"
    )
