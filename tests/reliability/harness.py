"""How the reliability suite runs training: real `python -m finetune` processes, optionally with a fault injected.

The standard run is tiny GPT-NeoX on CPU in fp32, so exact equality is meaningful: 10 optimizer steps of 4 x 2
(gradient accumulation) samples, cosine schedule, LoRA dropout 0.1, shuffled data, a checkpoint every 3 steps.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[2]
FAULT = Path(__file__).with_name("fault.py")


def overrides(model_dir: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        "model=tiny_neox",
        f"model.name_or_path={model_dir}",
        "model.tiny=null",
        f"output_dir={output_dir}",
        "trainer.max_steps=10",
        "trainer.per_device_train_batch_size=4",
        "trainer.gradient_accumulation_steps=2",
        "trainer.learning_rate=1e-2",
        "trainer.lr_scheduler_type=cosine",
        "trainer.logging_steps=1",
        "trainer.save_strategy=steps",
        "trainer.save_steps=3",
        "trainer.eval_strategy=no",
        "strategy.lora_dropout=0.1",
        "data.max_length=384",
        "eval_before_training=false",
        "sample_generations=0",
        *extra,
    ]


def finetune(
    args: list[str], fault: tuple[str, int] | None = None, env: dict | None = None
) -> subprocess.CompletedProcess:
    """`python -m finetune ARGS`, or the same through fault.py with a fault injected."""
    command = (
        [sys.executable, str(FAULT), fault[0], str(fault[1]), *args]
        if fault
        else [sys.executable, "-m", "finetune", *args]
    )
    return subprocess.run(
        command, cwd=PROJECT, capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})}
    )
