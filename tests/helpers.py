"""Helpers shared by the test modules (imported as `helpers`; conftest.py only holds fixtures)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
MODEL_CONFIG = {"neo": "tiny_neo", "neox": "tiny_neox", "gptj": "tiny_gptj"}


def tiny_overrides(arch: str, model_dir: Path, output_dir: Path, *extra: str) -> list[str]:
    """Overrides that point the demo preset at a tiny checkpoint and keep a run short."""
    return [
        f"model={MODEL_CONFIG[arch]}",
        f"model.name_or_path={model_dir}",
        "model.tiny=null",
        f"output_dir={output_dir}",
        "trainer.max_steps=6",
        "trainer.logging_steps=2",
        "trainer.per_device_train_batch_size=4",
        "trainer.learning_rate=1e-2",
        "sample_generations=1",
        "max_new_tokens=4",
        *extra,
    ]


def run_cli(*args: str, env: dict | None = None, timeout: int = 600):
    """`python -m finetune ARGS` in a subprocess (the production entry point)."""
    import subprocess

    return subprocess.run(
        [sys.executable, "-m", "finetune", *args],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
