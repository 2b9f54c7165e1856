"""The settings of a resolved config that decide memory and time (Setup), with trl's defaults for what the config
leaves out, and their names in the report."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from finetune.plan.hardware import Gpu

SDPA_FAMILIES = ("gpt_neox", "gpt_neo")  # GPT-Neo's is finetune.neo_attention; GPT-J has eager and FA2 only


@dataclass(frozen=True)
class Setup:
    """The settings of the config that decide memory and time."""

    strategy: str
    micro_batch: int
    max_length: int
    grad_accum: int
    checkpointing: bool
    optimizer: str
    device: str
    weight_bytes: int
    autocast: str | None
    attention: str
    backend: str
    zero_stage: int
    offload_optimizer: bool
    offload_params: bool
    deepspeed_bf16: bool
    packing: bool
    quant_double: bool
    sequences: int = 1
    """Sequences per row in a forward pass: 2 for preference objectives (chosen and rejected; KTO's completion and
    its KL mismatch), 1 for SFT."""
    reference_forward: bool = False
    """DPO / KTO score every batch with the frozen reference too: one more forward, without gradients."""
    reference_copy: bool = False
    """Full fine-tuning with DPO / KTO: a frozen copy of the model is the reference (no precomputed log-probs)."""

    @property
    def forward_rows(self) -> int:
        """The sequences of one micro-batch's forward pass."""
        return self.micro_batch * self.sequences

    @property
    def compute_bytes(self) -> int:
        """Matmul outputs: the autocast dtype, else the weights' dtype."""
        return 2 if self.autocast else self.weight_bytes

    @property
    def norm_bytes(self) -> int:
        """LayerNorm outputs: autocast runs layer_norm in fp32."""
        return 4 if self.autocast else self.weight_bytes

    @property
    def norm_input_copy(self) -> bool:
        """Autocast casts a bf16 LayerNorm input to fp32 and keeps that copy for backward."""
        return bool(self.autocast) and self.weight_bytes != 4

    @property
    def sharded(self) -> bool:
        return self.zero_stage == 3


def trainer_setting(trainer: dict, key: str):
    """trainer.KEY as trl.SFTConfig will take it (its default when the config does not set it)."""
    if key in trainer:
        return trainer[key]
    from trl import SFTConfig

    default = {f.name: f.default for f in dataclasses.fields(SFTConfig)}[key]
    return default.value if hasattr(default, "value") else default


def sharding(distributed) -> tuple[int, bool, bool]:
    """(ZeRO stage, optimizer state offloaded, parameters offloaded) of a `distributed:` section (a dict or a
    DictConfig). FSDP with reshard_after_forward shards like ZeRO-3, without it like ZeRO-2."""
    backend = distributed.get("backend", "none")
    if backend == "deepspeed":
        zero = (distributed.get("deepspeed") or {}).get("zero_optimization") or {}
        return (
            int(zero.get("stage", 0)),
            (zero.get("offload_optimizer") or {}).get("device", "none") in ("cpu", "nvme"),
            (zero.get("offload_param") or {}).get("device", "none") in ("cpu", "nvme"),
        )
    if backend == "fsdp":
        fsdp = distributed.get("fsdp_config") or {}
        offload = bool(fsdp.get("cpu_offload"))
        return (3 if fsdp.get("reshard_after_forward", True) else 2), offload, offload
    return 0, False, False


def setup_of(resolved: dict, device: Gpu) -> Setup:
    trainer, model, strategy, data = resolved["trainer"], resolved["model"], resolved["strategy"], resolved["data"]
    fp16 = bool(trainer_setting(trainer, "fp16"))
    bf16 = trainer_setting(trainer, "bf16")
    bf16 = (not fp16) if bf16 is None else bool(bf16)
    autocast = "bfloat16" if bf16 else "float16" if fp16 else None
    distributed = resolved.get("distributed") or {"backend": "none"}
    backend = distributed.get("backend", "none")
    stage, offload_optimizer, offload_params = sharding(distributed)
    ds_bf16 = bool(autocast)
    optimizer = str(trainer_setting(trainer, "optim"))
    if backend == "deepspeed":
        ds = distributed.get("deepspeed") or {}
        if ds.get("optimizer"):  # DeepSpeed's own optimizer replaces trainer.optim
            optimizer = f"{ds['optimizer'].get('type', 'AdamW')} (DeepSpeed)"
        enabled = (ds.get("bf16") or {}).get("enabled", "auto")
        ds_bf16 = bool(autocast) if enabled == "auto" else bool(enabled)
    attention = model.get("attn_implementation") or ("sdpa" if model["family"] in SDPA_FAMILIES else "eager")
    quantization = strategy.get("quantization") or {}
    return Setup(
        strategy=strategy["name"],
        micro_batch=int(trainer_setting(trainer, "per_device_train_batch_size")),
        max_length=int(data["max_length"]),
        grad_accum=int(trainer_setting(trainer, "gradient_accumulation_steps")),
        checkpointing=bool(trainer_setting(trainer, "gradient_checkpointing")),
        optimizer=optimizer,
        device="cpu" if device.key == "cpu" else "cuda",
        weight_bytes=4 if model["dtype"] == "float32" else 2,
        autocast=autocast,
        attention=attention,
        backend=backend,
        zero_stage=stage,
        offload_optimizer=offload_optimizer,
        offload_params=offload_params,
        deepspeed_bf16=ds_bf16,
        packing=data.get("packing") is True,  # auto packs only rows that gain; unpacked is the upper bound
        quant_double=bool(quantization.get("bnb_4bit_use_double_quant", False)),
        **_objective(resolved.get("objective") or {}, strategy["name"]),
    )


REFERENCE_FREE = ("orpo", "simpo")


def _objective(objective: dict, strategy: str) -> dict:
    """What a preference objective adds to a step: two sequences per row, and for DPO / KTO a reference forward
    (full fine-tuning: on a frozen copy, unless its log-probs are precomputed before training)."""
    name = objective.get("name", "sft")
    if name == "sft":
        return {}
    reference = name not in REFERENCE_FREE
    precomputed = bool(objective.get("precompute_ref_log_probs"))
    return {
        "sequences": 2,
        "reference_forward": reference and not precomputed,
        "reference_copy": reference and not precomputed and strategy == "full",
    }


def adapter_bytes(setup: Setup) -> int:
    """dtype of LoRA weights: peft upcasts them to fp32 (autocast_adapter_dtype=True), except where trl keeps them
    in bf16 (QLoRA) or in the base's dtype (LoRA under ZeRO-3), and where DeepSpeed casts the whole module to bf16."""
    if setup.strategy == "qlora" or (setup.backend == "deepspeed" and setup.deepspeed_bf16):
        return 2
    if setup.backend == "deepspeed" and setup.zero_stage == 3:
        return setup.weight_bytes
    return 4


def dtype_name(nbytes: int) -> str:
    return {4: "fp32", 2: "bf16"}.get(nbytes, f"{nbytes} B")


def precision_name(setup: Setup) -> str:
    weights = dtype_name(setup.weight_bytes)
    if setup.autocast:
        return f"{weights} weights, {setup.autocast} autocast"
    return f"{weights} weights, no autocast"


def distributed_name(setup: Setup) -> str:
    if setup.backend == "deepspeed":
        offload = [k for k, on in (("optimizer", setup.offload_optimizer), ("params", setup.offload_params)) if on]
        return f"DeepSpeed ZeRO-{setup.zero_stage}" + (f" + CPU offload ({', '.join(offload)})" if offload else "")
    if setup.backend == "fsdp":
        shard = "full shard (planned like ZeRO-3)" if setup.zero_stage == 3 else "no reshard (planned like ZeRO-2)"
        return f"FSDP {shard}" + (" + CPU offload" if setup.offload_params else "")
    return setup.backend
