"""The GPUs the planner knows: memory and dense peak per dtype, and finding one by name (`gpu=h100-80gb`)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from finetune.errors import ConfigError, did_you_mean


@dataclass(frozen=True)
class Gpu:
    key: str
    name: str
    memory_gib: float | None
    """What nvidia-smi reports as total memory (None: CPU, RAM is not checked)."""
    bf16_tflops: float | None
    """Dense tensor-core peak (no sparsity); None: no bf16 on this GPU."""
    fp16_tflops: float | None
    fp32_tflops: float | None
    """Plain fp32 (PyTorch leaves TF32 matmuls off by default)."""


GPUS = {
    gpu.key: gpu
    for gpu in (
        Gpu("t4-16gb", "NVIDIA T4 16GB", 15.0, None, 65.0, 8.1),
        Gpu("l4-24gb", "NVIDIA L4 24GB", 22.5, 121.0, 121.0, 30.3),
        Gpu("a10-24gb", "NVIDIA A10 24GB", 22.5, 125.0, 125.0, 31.2),
        Gpu("rtx4090-24gb", "NVIDIA GeForce RTX 4090 24GB", 24.0, 165.2, 165.2, 82.6),
        Gpu("a100-40gb", "NVIDIA A100 40GB", 40.0, 312.0, 312.0, 19.5),
        Gpu("a100-80gb", "NVIDIA A100 80GB", 80.0, 312.0, 312.0, 19.5),
        Gpu("h100-80gb", "NVIDIA H100 80GB SXM", 79.6, 989.0, 989.0, 67.0),
        Gpu("h200-141gb", "NVIDIA H200 141GB", 140.4, 989.0, 989.0, 67.0),
        Gpu("cpu", "CPU (RAM)", None, None, None, None),
    )
}


def find_gpu(name: str) -> Gpu:
    """The GPU table entry for a name such as h100-80gb (case and _ / - insensitive)."""
    key = re.sub(r"[\s_]+", "-", str(name).strip().lower())
    if key in GPUS:
        return GPUS[key]
    raise ConfigError(
        f"gpu={name}: not a GPU the planner knows{did_you_mean(key, GPUS, cutoff=0.4)}; "
        f"choose one of: {', '.join(GPUS)}"
    )
