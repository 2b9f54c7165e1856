"""Memory per GPU apart from activations (finetune.plan.activations): frozen and trainable weights, gradients,
optimizer states, DeepSpeed ZeRO / FSDP partitioning and CPU offload, sharding buffers, model buffers, the fixed
CUDA context, QLoRA's dequantization and DoRA's weight norm."""

from __future__ import annotations

from dataclasses import dataclass

from finetune.plan.architecture import Adapter, Architecture
from finetune.plan.setup import Setup, adapter_bytes, dtype_name

GIB = 2**30
CUDA_CONTEXT_BYTES = int(0.75 * GIB)  # CUDA context, cuBLAS/cuDNN workspaces and kernels of torch 2.x: a fixed charge
NCCL_BYTES = int(0.5 * GIB)  # NCCL communicators and their buffers when more than one GPU takes part
ZERO3_GATHERED_LAYERS = 2  # ZeRO-3 holds the layer it computes and the one it prefetches, gathered in bf16
QLORA_BYTES_PER_PARAM = {
    True: 0.5 + 1 / 64 + 4 / (64 * 256),
    False: 0.5 + 4 / 64,
}  # NF4 + absmax, by double quantization
ADAMW = (
    "adamw_torch",
    "adamw_torch_fused",
    "adamw_hf",
    "adamw_apex_fused",
    "adamw_torch_xla",
    "adamw_torch_npu_fused",
    "adamw_anyprecision",
    "adamw",
)
EIGHT_BIT = ("_8bit", "8bit")


@dataclass
class MemoryLine:
    name: str
    bytes: int
    detail: str = ""


def gib(value: int | None) -> str:
    return "-" if value is None else f"{value / GIB:.1f}"


def memory_lines(arch: Architecture, adapter_: Adapter | None, setup: Setup, num_gpus: int) -> tuple[list, int]:
    """Per-GPU memory lines and the bytes offloaded to CPU RAM per GPU."""
    shards = num_gpus if setup.sharded else 1
    trainable = adapter_.trainable if adapter_ else arch.total_params
    frozen = arch.total_params if adapter_ else 0
    lines, cpu = [], 0

    frozen_bytes, frozen_detail = frozen_weight_bytes(arch, setup, frozen)
    if frozen:
        if setup.offload_params:
            cpu += frozen_bytes // shards
            frozen_detail += ", offloaded to CPU (ZeRO-3 offload_param)"
            frozen_bytes = 0
        lines.append(MemoryLine("frozen weights", frozen_bytes // shards, frozen_detail + _shard_note(shards)))

    param_bytes, grad_bytes, state_bytes, state_detail = trainable_bytes(setup, adapter_ is not None)
    zero = (
        setup.backend in ("deepspeed", "fsdp") and setup.zero_stage > 0
    )  # optimizer state (and from stage 2 gradients) sharded
    weights = trainable * param_bytes // shards
    grads = trainable * grad_bytes // (num_gpus if zero and setup.zero_stage >= 2 else shards)
    states = trainable * state_bytes // (num_gpus if zero else shards)
    kind = "adapter" if adapter_ else "model"
    if setup.offload_params:
        cpu, weights = cpu + weights, 0
    lines.append(
        MemoryLine(f"trainable weights ({kind})", weights, f"{trainable:,} x {param_bytes} B" + _shard_note(shards))
    )
    if setup.offload_optimizer:
        cpu += states + (grads if setup.zero_stage >= 2 else 0)
        states = 0
        grads = grads if setup.zero_stage < 2 else 0
        state_detail += ", offloaded to CPU (ZeRO offload_optimizer)"
    lines.append(
        MemoryLine(
            "gradients", grads, f"{grad_bytes} B each" + _shard_note(num_gpus if zero and setup.zero_stage >= 2 else 1)
        )
    )
    lines.append(MemoryLine("optimizer states", states, state_detail + _shard_note(num_gpus if zero else 1)))
    if num_gpus > 1 and setup.backend not in ("deepspeed", "fsdp"):
        lines.append(
            MemoryLine(
                "DDP gradient buckets", trainable * grad_bytes, "DDP copies gradients into buckets of the same size"
            )
        )
    if setup.backend in ("deepspeed", "fsdp") and setup.zero_stage >= 2:
        lines.append(MemoryLine("sharding buffers", zero_buffer_bytes(arch, setup), zero_buffer_detail(setup)))
    if setup.reference_copy:
        lines.append(
            MemoryLine(
                "reference model (frozen copy)",
                arch.total_params * setup.weight_bytes // shards,
                f"DPO / KTO full fine-tuning: {arch.total_params:,} x {setup.weight_bytes} B; "
                "objective.precompute_ref_log_probs=true drops it" + _shard_note(shards),
            )
        )
    if arch.buffer_bytes >= 2**20:
        lines.append(
            MemoryLine("model buffers", arch.buffer_bytes, "causal-mask and rotary tables the model registers")
        )
    if setup.device == "cuda":
        lines.append(
            MemoryLine(
                "CUDA context (fixed)",
                CUDA_CONTEXT_BYTES + (NCCL_BYTES if num_gpus > 1 else 0),
                "context, cuBLAS workspaces" + (", NCCL buffers" if num_gpus > 1 else ""),
            )
        )
    if setup.strategy == "qlora":
        lines.append(
            MemoryLine(
                "4-bit dequantization",
                arch.largest_linear * setup.compute_bytes,
                "the largest Linear dequantized to bf16 while it runs",
            )
        )
    if adapter_ and adapter_.dora:
        lines.append(
            MemoryLine(
                "DoRA weight norm",
                3 * arch.largest_linear * 4,
                "W, B@A and W + B@A of the largest Linear in fp32 while its column norms are taken",
            )
        )
    return lines, cpu


def frozen_weight_bytes(arch: Architecture, setup: Setup, frozen: int) -> tuple[int, str]:
    if setup.strategy != "qlora":
        return frozen * setup.weight_bytes, f"{frozen:,} x {setup.weight_bytes} B ({dtype_name(setup.weight_bytes)})"
    per_layer = sum(i * o for (i, o) in arch.layer_linears.values())
    quantized = per_layer * arch.layers
    nf4 = QLORA_BYTES_PER_PARAM[setup.quant_double]
    rest = frozen - quantized
    detail = (
        f"{quantized:,} in NF4 at {nf4:.3f} B (with {'double ' if setup.quant_double else ''}quantization constants) "
        f"+ {rest:,} unquantized (embeddings, LM head, norms, biases) x {setup.compute_bytes} B"
    )
    return int(quantized * nf4) + rest * setup.compute_bytes, detail


def trainable_bytes(setup: Setup, is_adapter: bool) -> tuple[int, int, int, str]:
    """(weight, gradient, optimizer-state) bytes per trainable parameter and what the states are."""
    if setup.backend == "deepspeed" and setup.deepspeed_bf16:
        param = 2
        master = 4
    else:
        param = adapter_bytes(setup) if is_adapter else setup.weight_bytes
        master = 0
    moments, per_moment, name = optimizer_states(setup.optimizer)
    state_bytes = master + moments * (per_moment or max(param, 4 if master else param))
    detail = f"{name}: {moments} x {(per_moment or max(param, 4 if master else param))} B"
    if master:
        detail = f"fp32 master copy 4 B + {detail} (DeepSpeed mixed precision)"
    elif not is_adapter and param == 2:
        detail += " (full fine-tuning in bf16: no fp32 master copy)"
    return param, param, state_bytes, detail


def optimizer_states(name: str) -> tuple[int, int | None, str]:
    """(moments kept per parameter, bytes each or None for the parameter's dtype, description)."""
    low = name.lower()
    if any(tag in low for tag in EIGHT_BIT):
        return 2, 1, f"{name} (8-bit moments)"
    if low in ADAMW or low.startswith("adam"):
        return 2, None, f"{name} (two moments)"
    if "lion" in low:
        return 1, None, f"{name} (one moment)"
    if low.startswith("sgd"):
        return 0, None, f"{name} (no momentum)"
    if "adafactor" in low:
        return 0, None, f"{name} (factored second moments, close to 0)"
    return 2, None, f"{name} (unknown to the planner: assumed AdamW-like, two moments)"


def zero_buffer_bytes(arch: Architecture, setup: Setup) -> int:
    """ZeRO-2: reduce buckets; ZeRO-3 / FSDP full shard: also the gathered weights of the block computed and the one
    prefetched (DeepSpeed caps them at stage3_max_live_parameters, 1e9)."""
    bucket = arch.hidden**2 * 2  # reduce_bucket_size auto = hidden^2 elements, in bf16
    if setup.zero_stage < 3:
        return 2 * bucket
    largest = max(arch.layer_params, arch.output_embedding_params, arch.embedding_params)
    return ZERO3_GATHERED_LAYERS * min(largest, 10**9) * 2 + 2 * bucket


def zero_buffer_detail(setup: Setup) -> str:
    if setup.zero_stage < 3:
        return "gradient reduce buckets (hidden^2 elements each)"
    return f"{ZERO3_GATHERED_LAYERS} gathered layers in bf16 (computed + prefetched) and gradient reduce buckets"


def _shard_note(shards: int) -> str:
    return f", sharded over {shards} GPUs" if shards > 1 else ""
