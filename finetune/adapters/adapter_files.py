"""A PEFT LoRA/DoRA adapter folder read as plain tensors, grouped by adapted module, with its scale: what the
streaming merge folds in and the numerical gate checks against. Anything merging would get wrong is refused here.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from finetune.errors import IntegrityError
from finetune.models import shards

ADAPTER_PREFIX = "base_model.model."
LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_magnitude_vector)$")
# adapter_config.json fields that change what merging means; this merge handles none of them
ABSURD_WEIGHT = 1e4  # |weight| above this in an adapter is corruption, not training
UNSUPPORTED = (
    "modules_to_save",
    "trainable_token_indices",
    "layer_replication",
    "target_parameters",
    "use_qalora",
    "alora_invocation_tokens",
    "use_bdlora",
)


@dataclass
class LoraModule:
    """One adapted Linear: W' = W + scale * B @ A (DoRA: then rescaled per output row to the learned magnitude)."""

    name: str
    A: object = None
    B: object = None
    bias: object = None  # lora_bias=True: added to the base bias
    magnitude: object = None  # DoRA
    scale: float = 1.0

    def merged(self, weight, fan_in_fan_out: bool):
        """The merged weight in fp32 (peft's formulas: LoRA get_delta_weight, DoRA merge)."""
        delta = self.scale * (self.B.float() @ self.A.float())
        if fan_in_fan_out:
            delta = delta.T
        merged = weight.float() + delta
        if self.magnitude is None:
            return merged
        oriented = merged.T if fan_in_fan_out else merged
        factor = self.magnitude.float() / oriented.norm(p=2, dim=1)
        return (factor.view(-1, 1) * oriented).T if fan_in_fan_out else factor.view(-1, 1) * oriented


@dataclass
class Adapter:
    folder: Path
    config: dict
    modules: dict[str, LoraModule] = field(default_factory=dict)

    @property
    def fan_in_fan_out(self) -> bool:
        return bool(self.config.get("fan_in_fan_out"))

    @property
    def dora(self) -> bool:
        return bool(self.config.get("use_dora"))


def load_adapter(folder: Path, allow_pickle: bool) -> Adapter:
    """The adapter's config and tensors, grouped by adapted module; anything this merge cannot merge is refused."""
    config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    if config.get("peft_type") != "LORA":
        raise IntegrityError(
            f"{folder}: peft_type {config.get('peft_type')}: only LoRA and DoRA adapters can be merged here"
        )
    found = [key for key in UNSUPPORTED if config.get(key)]
    if config.get("bias", "none") != "none":
        found.append(f"bias={config['bias']}")
    if found:
        raise IntegrityError(
            f"{folder}: adapter_config.json sets {', '.join(found)}, which this streaming merge does not "
            "merge; use peft's merge_and_unload on a machine that holds the whole model"
        )
    tensors = _adapter_tensors(folder, allow_pickle)
    _check_values(folder, tensors)
    adapter = Adapter(folder, config)
    for key, tensor in tensors.items():
        match = LORA_KEY.match(key.removeprefix(ADAPTER_PREFIX))
        if not key.startswith(ADAPTER_PREFIX) or not match:
            raise IntegrityError(
                f"{folder}: adapter tensor '{key}' is not a LoRA/DoRA weight this merge understands "
                "(modules_to_save or trainable tokens?); use peft's merge_and_unload"
            )
        module = adapter.modules.setdefault(match["module"], LoraModule(match["module"]))
        attribute = {
            "lora_A.weight": "A",
            "lora_B.weight": "B",
            "lora_B.bias": "bias",
            "lora_magnitude_vector": "magnitude",
        }
        setattr(module, attribute[match["part"]], tensor)
    for name, module in adapter.modules.items():
        if module.A is None or module.B is None or (adapter.dora and module.magnitude is None):
            raise IntegrityError(
                f"{folder}: module {name} lacks lora_A, lora_B{' or its DoRA magnitude' if adapter.dora else ''}"
            )
        if module.B.shape[1] != module.A.shape[0]:
            raise IntegrityError(
                f"{folder}: module {name}: lora_B {tuple(module.B.shape)} does not fit lora_A {tuple(module.A.shape)}"
            )
        r = _pattern(config.get("rank_pattern") or {}, name, config["r"])
        alpha = _pattern(config.get("alpha_pattern") or {}, name, config["lora_alpha"])
        module.scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return adapter


def _check_values(folder: Path, tensors: dict) -> None:
    """Refuse NaN/inf and absurd magnitudes: one flipped exponent bit turns a weight into 1e37, and the numerical gate,
    comparing against the same adapter, cannot see it. Trained LoRA factors and DoRA magnitudes stay far below
    ABSURD_WEIGHT."""
    for name, tensor in tensors.items():
        if not tensor.is_floating_point() or tensor.numel() == 0:
            continue
        values = tensor.float()
        bad = ~values.isfinite() | (values.abs() > ABSURD_WEIGHT)
        if bad.any():
            first = values[bad][0].item()
            raise IntegrityError(
                f"{folder / 'adapter_model.safetensors'}: tensor {name} holds {int(bad.sum())} value(s) "
                f"that are not finite or above {ABSURD_WEIGHT:g} in magnitude (first: {first:g}); the "
                "adapter is corrupt. Use the last good checkpoint's adapter or train again"
            )


def _pattern(patterns: dict, module: str, default):
    """peft's rank_pattern / alpha_pattern lookup (utils.other.get_pattern_key)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _adapter_tensors(folder: Path, allow_pickle: bool) -> dict:
    path = folder / "adapter_model.safetensors"
    if path.is_file():
        with shards.ShardReader(path) as reader:
            return {name: reader.read(name) for name in reader.tensors}
    pickled = folder / "adapter_model.bin"
    if pickled.is_file() and allow_pickle:
        return shards.load_pickled(pickled)
    if pickled.is_file():
        raise IntegrityError(
            f"{folder}: adapter_model.bin is pickled; unpickling can run arbitrary code. Pass "
            "allow_pickle=true to read it with torch.load(weights_only=True)"
        )
    raise IntegrityError(f"{folder}: no adapter_model.safetensors")


def module_of(tensor_name: str, modules: dict) -> str | None:
    """The adapted module a base tensor belongs to (checkpoints may or may not carry the model prefix)."""
    stem = tensor_name.removesuffix(".weight")
    if stem in modules:
        return stem
    for module in modules:
        if module.endswith("." + stem) or stem.endswith("." + module):
            return module
    return None
