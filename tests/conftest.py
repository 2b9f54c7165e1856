"""Shared fixtures: tiny checkpoints of each architecture, built once per session, offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # any Hub access is a test failure
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Unpretrained tiny neo / neox / gptj checkpoints on disk (loaded through from_pretrained by the code)."""
    from finetune.models import tiny

    root = tmp_path_factory.mktemp("tiny")
    return {arch: tiny.build(arch, root / arch) for arch in ("neo", "neox", "gptj")}


@pytest.fixture(scope="session")
def tiny_run(tiny_models, tmp_path_factory) -> Path:
    """One short LoRA run on tiny NeoX over the demo data (trained for real), shared by the read-only consumers of a
    run directory: evaluate, embed, the harness bridge. Tests must not modify it; copy it first."""
    from finetune.config.compose import compose
    from finetune.train.run import run

    from helpers import tiny_overrides

    cfg = compose(
        "demo",
        tiny_overrides(
            "neox",
            tiny_models["neox"],
            tmp_path_factory.mktemp("tiny_run") / "run",
            "trainer.max_steps=4",
            "sample_generations=0",
        ),
    )
    return run(cfg)
