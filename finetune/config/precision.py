"""`model.dtype=auto` / `trainer.bf16=auto` (the defaults): bf16 where the hardware computes it natively, else fp32.

Never fp16 by default: GPT-Neo and NeoX overflow in it. On CPUs the choice matters more than it looks, because
oneDNN runs bf16 everywhere but emulates it without the instructions. Measured with 1024^2 GEMMs, torch 2.13:
- 2-core Intel Xeon @ 2.50GHz without AVX512-BF16: fp32 188 GFLOP/s, bf16 51 (3.7x slower);
- 2-core AMD EPYC with AVX512-BF16: fp32 186, bf16 700-740 (3.9x faster).
So bf16 is chosen on a CPU whose flags show `avx512_bf16` or `amx_bf16` (x86) or `bf16` (aarch64), and on a GPU
torch reports bf16 for (Ampere and newer; T4 and V100 get fp32).
"""

from __future__ import annotations

from pathlib import Path

AUTO = "auto"
NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU feature flags the kernel reports (x86 `flags`, aarch64 `Features`); empty where unreadable."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def choose(cuda: bool | None = None, flags: set[str] | None = None) -> tuple[bool, str]:
    """(use bf16?, why) for the machine this process runs on."""
    import torch

    cuda = torch.cuda.is_available() if cuda is None else cuda
    if cuda:
        name = torch.cuda.get_device_name()
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return True, f"bf16: {name} computes it natively"
        return False, f"fp32: {name} has no native bf16 (fp16 overflows on this family)"
    flags = cpu_flags() if flags is None else flags
    native = sorted(set(NATIVE_BF16_CPU_FLAGS) & flags)
    if native:
        return True, f"bf16: this CPU has {', '.join(native)}"
    return False, "fp32: this CPU has no native bf16 (avx512_bf16/amx_bf16), where bf16 runs ~4x slower than fp32"


def resolve(resolved: dict, bf16: bool) -> bool:
    """Replace `auto` in model.dtype and trainer.bf16 by the choice; True when anything was `auto`."""
    model, trainer = resolved["model"], resolved["trainer"]
    was_auto = False
    if model.get("dtype") == AUTO:
        model["dtype"] = "bfloat16" if bf16 and not trainer.get("fp16") else "float32"
        was_auto = True
    if trainer.get("bf16") == AUTO:
        trainer["bf16"] = bf16 and not trainer.get("fp16")
        was_auto = True
    return was_auto


def describe(resolved: dict) -> str:
    """The precision a resolved config trains in, for the run log."""
    model, trainer = resolved["model"], resolved["trainer"]
    mixed = (
        "bf16 autocast"
        if trainer.get("bf16")
        else "fp16 autocast with loss scaling"
        if trainer.get("fp16")
        else "no autocast"
    )
    return f"weights {model['dtype']}, {mixed}"
