"""Shared runs for the reliability suite: one uninterrupted reference and one run killed after its 2nd checkpoint."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from harness import finetune, overrides


@pytest.fixture(scope="session")
def reference(tiny_models, tmp_path_factory) -> Path:
    """The uninterrupted run every resumed run must reproduce bit for bit."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    result = finetune(overrides(tiny_models["neox"], run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="session")
def killed_template(tiny_models, tmp_path_factory) -> Path:
    """A run SIGKILLed during step 8: checkpoint-3 and checkpoint-6 committed, steps 7-8 lost."""
    run_dir = tmp_path_factory.mktemp("killed") / "run"
    result = finetune(overrides(tiny_models["neox"], run_dir), fault=("KILL", 7))
    assert result.returncode == -9, result.stderr[-3000:]
    return run_dir


@pytest.fixture
def killed(killed_template, tmp_path) -> Path:
    """A private copy of the killed run, to corrupt or resume."""
    return Path(shutil.copytree(killed_template, tmp_path / "run", symlinks=True))
