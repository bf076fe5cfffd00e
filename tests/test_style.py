"""ruff holds the repo's style and shape (pyproject.toml: a function about a screen, few arguments)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ruff_finds_nothing():
    pytest.importorskip("ruff", reason="ruff is not installed (requirements-dev.txt has it)")
    run = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=ROOT,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
