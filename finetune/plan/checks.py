"""The config checked as training checks it, and what the planner says about it besides the numbers.

checked_config runs finetune.config.validate with a Hub model's architecture checks against its shipped config.json
(the planner never contacts the Hub). Problems of the machine the planner runs on (Problem.kind "machine": no CUDA
for QLoRA, DeepSpeed not installed, where the run would write) do not stop a plan: they become notes, as do
validation's warnings other than those about how this process was launched (num_gpus= stands for the launch).
setup_notes: what the numbers assume or leave out for this setup."""

from __future__ import annotations

import json
from pathlib import Path

from finetune.errors import ConfigError, Problem, kind_of
from finetune.plan.architecture import (
    Architecture,
    no_architecture_problem,
    shipped_config_path,
)
from finetune.plan.hardware import Gpu
from finetune.plan.memory import gib
from finetune.plan.setup import Setup

# Warnings about how this process was launched: the planner's num_gpus= stands for the launch.
LAUNCH_WARNINGS = ("distributed=ddp in a single process", "distributed=fsdp in a single process")


def checked_config(cfg) -> tuple[dict, list[str]]:
    """validate() as training runs it, with a Hub model's architecture checks run against its shipped config.json
    (the planner never contacts the Hub); problems of this machine only (no CUDA, no DeepSpeed) become notes."""
    from omegaconf import OmegaConf

    from finetune.config.validate import validate

    container = cfg if isinstance(cfg, dict) else _resolved_or_none(cfg)
    if container is None:  # does not resolve: validate() says why
        validate(cfg)
    model = container["model"]
    offline = dict(container)
    if not Path(model["name_or_path"]).expanduser().exists() and not model.get("tiny"):
        shipped = shipped_config_path(model)
        if shipped is None:
            raise ConfigError(no_architecture_problem(model))
        offline["model"] = {**model, "name_or_path": str(shipped)}
    notes = []
    try:
        resolved, warnings = validate(OmegaConf.create(offline))
        notes += [f"warning: {w}" for w in warnings if not w.startswith(LAUNCH_WARNINGS)]
    except ConfigError as err:
        real = [p for p in err.problems if kind_of(p) != Problem.MACHINE]
        if real:
            raise ConfigError(real) from None
        resolved = json.loads(json.dumps(offline))
        notes += [f"on this machine training would stop: {p}" for p in err.problems]
    resolved["model"]["name_or_path"] = model["name_or_path"]
    return resolved, notes


def _resolved_or_none(cfg) -> dict | None:
    from omegaconf import OmegaConf

    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    except Exception:  # noqa: BLE001 - validate() reports it with the key
        return None


def setup_notes(arch: Architecture, setup: Setup, device: Gpu, num_gpus: int, resolved: dict) -> list[str]:
    notes = []
    if setup.device == "cuda" and setup.autocast == "bfloat16" and device.bf16_tflops is None:
        notes.append(
            f"{device.name} has no bf16: trainer.bf16=true stops at start-up there; fp16 overflows on this family "
            "(validate refuses it without allow_fp16=true); use an Ampere or newer GPU"
        )
    if setup.device == "cpu" and (setup.autocast or setup.weight_bytes != 4):
        notes.append("CPU planning is validated for fp32 (model.dtype=float32 trainer.bf16=false) only")
    if setup.backend not in ("none", "ddp", "deepspeed", "fsdp"):
        notes.append(f"distributed.backend={setup.backend}: unknown to the planner, planned as replicated (DDP-like)")
    if setup.backend == "ddp" and num_gpus == 1:
        notes.append(
            "distributed=ddp on one GPU: nothing to replicate; set num_gpus=N for the per-GPU plan of N processes"
        )
    if setup.backend == "fsdp":
        notes.append(
            "FSDP is planned like ZeRO: reshard_after_forward=true shards weights, gradients and optimizer state "
            "over num_gpus (ZeRO-3), false keeps the weights whole (ZeRO-2); no fp32 master copy"
        )
    if num_gpus > 1 and setup.backend == "none":
        notes.append(
            f"num_gpus={num_gpus} with distributed=none is plain DDP: every GPU holds everything; "
            "distributed=zero2|zero3 shard the training state"
        )
    if setup.sequences > 1:
        reference = (
            "; the reference scores every batch too (one more forward, no gradients)" if setup.reference_forward else ""
        )
        copy = "; full fine-tuning keeps a frozen copy as the reference" if setup.reference_copy else ""
        notes.append(
            f"objective={(resolved.get('objective') or {}).get('name')}: each row is 2 sequences (chosen and "
            f"rejected, or KTO's completion and its KL pair), so activations and tokens are planned for "
            f"{setup.forward_rows} sequences per micro-batch{reference}{copy}"
        )
    if setup.offload_optimizer or setup.offload_params:
        notes.append(
            "CPU offload: tokens/s is an upper bound; CPU Adam and PCIe transfers usually make steps several times "
            "slower"
        )
    if setup.strategy == "qlora":
        notes.append(
            "QLoRA: 4-bit Linears return their input's dtype; activations are planned as for LoRA on a bf16 base "
            "(not measured); dequantization adds time the FLOPs do not show"
        )
    if setup.strategy in ("dora",) or resolved["strategy"].get("use_dora"):
        notes.append(
            "DoRA: the magnitude terms come from peft's code, not a measurement; steps run ~1.2-2x longer than "
            "LoRA, which FLOPs do not show"
        )
    if setup.strategy == "full" and setup.backend != "deepspeed" and setup.weight_bytes == 2:
        notes.append(
            "full fine-tuning without DeepSpeed trains the bf16 weights directly (the Trainer keeps no fp32 master "
            "copy): 8 B per parameter with AdamW, but small updates can be lost to bf16 rounding"
        )
    model = resolved["model"]
    if not Path(model["name_or_path"]).expanduser().exists() and model.get("revision", "main") != "main":
        notes.append(
            f"model.revision={model['revision']}: the shipped config is the main branch's; the architecture is the same"
        )
    if setup.packing:
        notes.append("data.packing=true: every row is a full max_length; the time is per 100M tokens")
    notes.append(
        "activations assume every row is max_length tokens long (padding to the longest row of a batch can "
        "only make them smaller)"
    )
    logits = setup.forward_rows * setup.max_length * arch.vocab * (setup.compute_bytes + 4 + 4)
    notes.append(
        f"trl's fused LM head never builds the {setup.forward_rows} x {setup.max_length} x {arch.vocab} logits; "
        f"a plain transformers loss would add about {gib(logits)} GiB (logits, their fp32 copy and gradient)"
    )
    return notes
