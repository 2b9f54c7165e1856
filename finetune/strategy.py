"""Strategies: LoRA, DoRA and QLoRA become a peft.LoraConfig; full fine-tuning trains every weight.

Every strategy key except `name` and `quantization` is a peft.LoraConfig field, passed through unchanged, so
peft's documentation is ours. Wrapping itself is left to trl's SFTTrainer (`peft_config=`), which also prepares
k-bit models and gradient checkpointing the way peft expects.
"""

from __future__ import annotations

OUR_KEYS = ("name", "quantization")
ADAPTER_STRATEGIES = ("lora", "dora", "qlora")


def peft_config(strategy: dict):
    """A peft.LoraConfig for adapter strategies, None for full fine-tuning."""
    if strategy["name"] not in ADAPTER_STRATEGIES:
        return None
    from peft import LoraConfig

    kwargs = {k: v for k, v in strategy.items() if k not in OUR_KEYS}
    kwargs["use_dora"] = strategy["name"] == "dora" or kwargs.get("use_dora", False)
    return LoraConfig(task_type="CAUSAL_LM", **kwargs)


def quantization(strategy: dict) -> dict | None:
    """BitsAndBytesConfig kwargs for QLoRA, None otherwise."""
    return dict(strategy["quantization"]) if strategy["name"] == "qlora" else None


def bitsandbytes_problem(cuda: bool) -> str | None:
    """Why 4-bit NF4 cannot run here, or None. bitsandbytes >= 0.49 ships CPU kernels (checked on 0.50.2: load, LoRA
    training and merging all work on CPU); older releases and builds without its native CPU library are CUDA only."""
    import importlib.metadata
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        return 'bitsandbytes is not installed; pip install -e ".[quant]"'
    if cuda:
        return None
    import bitsandbytes
    import bitsandbytes.cextension as native

    version = importlib.metadata.version("bitsandbytes")
    if "cpu" not in getattr(bitsandbytes, "supported_torch_devices", ()) or isinstance(native.lib, native.ErrorHandlerMockBNBNativeLibrary):
        return f"no CUDA GPU, and bitsandbytes {version} has no CPU 4-bit kernels here (0.49 or newer has them: pip install -U bitsandbytes)"
    return None


def lora_fields() -> set[str]:
    """Keys peft.LoraConfig accepts (for validation)."""
    import dataclasses

    from peft import LoraConfig

    return {f.name for f in dataclasses.fields(LoraConfig) if f.init}
