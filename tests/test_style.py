"""The code's style is ruff's, configured in pyproject.toml ([tool.ruff]: pycodestyle, pyflakes, isort, lines of at most
120 characters): `ruff check` and `ruff format --check` pass over everything Python we ship or run (issue 21 item 3).
ruff comes with the dev extra; to fix what this reports, run `ruff format` and `ruff check --fix` on the files named."""

from __future__ import annotations

import subprocess
import sys

import pytest

from helpers import PROJECT

PATHS = ("finetune", "tests", "benchmarks", "recipes")


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["check", "format"])
def test_ruff(command):
    result = subprocess.run(
        [sys.executable, "-m", "ruff", *command, "--no-cache", *PATHS],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"ruff {' '.join(command)} failed:\n{result.stdout}{result.stderr}"
