"""`finetune plan conf=PRESET serve=true`: the GPU memory serving the preset's model needs (finetune generate, the
server), for each precision generate can load it in, from the architecture alone.

Per choice (bf16, fp16, fp32 weights; bitsandbytes 4bit NF4 or 8bit LLM.int8 with bf16 compute):
- weights: every parameter at its dtype; quantized, each layer's Linear weights at NF4 (0.5 B + absmax constants) or
  int8 (1 B + one fp32 scale per output row), while embeddings, the LM head, norms and biases stay bf16 (transformers
  never quantizes the output embedding);
- adapters: `serve_adapters` LoRA adapters of the preset's strategy, in fp32 (peft upcasts adapter weights on load);
- KV cache: 2 (K and V) x layers x hidden x bytes per token, for `serve_batch` concurrent sequences of
  `serve_context` tokens each (prompt and generated tokens together);
- prefill: one layer's MLP input, intermediate and output for all those tokens at once, one layer's K and V again
  (the cache grows by torch.cat, which copies it) and the last position's fp32 logits: an upper bound when requests
  are prefilled one at a time;
- the CUDA context.
It fits one GPU when the total stays under its memory less `headroom`; `max batch` is the most sequences of
`serve_context` tokens one GPU holds; `device_map=auto` is how many of the GPU the layers need when accelerate places
them in order (embeddings on the first, the LM head on the last, each layer with its KV cache on one GPU).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from finetune.errors import ConfigError
from finetune.plan.architecture import Architecture, adapter, architecture
from finetune.plan.hardware import Gpu
from finetune.plan.memory import CUDA_CONTEXT_BYTES, GIB, QLORA_BYTES_PER_PARAM, gib

CHOICES = ("bf16", "fp16", "fp32", "4bit", "8bit")
VALUE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "4bit": 2, "8bit": 2}  # activations and KV cache: the compute dtype
ADAPTER_BYTES = 4  # peft loads LoRA weights in fp32 (autocast_adapter_dtype=True)
LOGIT_BYTES = 4  # transformers upcasts the last position's logits to fp32 before sampling
INT8_SCALE_BYTES = 4  # LLM.int8: one fp32 scale per output row (Int8Params.SCB)
DTYPE_CHOICE = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


@dataclass
class ServeChoice:
    choice: str
    weights_bytes: int
    adapter_bytes: int
    kv_cache_bytes: int
    prefill_bytes: int
    context_bytes: int
    total_bytes: int
    fits: bool | None
    """On one GPU, within its memory less headroom (None on CPU)."""
    max_batch: int | None
    """The most concurrent sequences of `context` tokens one GPU holds (None on CPU)."""
    gpus_needed: int | None
    """device_map=auto: GPUs of this kind the layers need (None on CPU, or when one layer alone does not fit)."""


@dataclass
class ServePlan:
    preset: str | None
    gpu: Gpu
    num_gpus: int
    model: str
    family: str
    strategy: str
    total_params: int
    layers: int
    hidden: int
    batch: int
    context: int
    adapters: int
    adapter_params: int
    kv_bytes_per_token: int
    """2 (K, V) x layers x hidden x 2 B: bf16/fp16 and the quantized choices (fp32 doubles it)."""
    capacity_bytes: int | None
    usable_bytes: int | None
    default: str
    """What generate loads for a run of this preset when quant= and dtype= are not given."""
    choices: list[ServeChoice] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def check_options(batch: int, context: int | None, adapters: int | None) -> None:
    problems = []
    if batch < 1:
        problems.append(f"serve_batch={batch}: the concurrent sequences, 1 or more")
    if context is not None and context < 1:
        problems.append(f"serve_context={context}: tokens per sequence (prompt + generated), 1 or more")
    if adapters is not None and adapters < 0:
        problems.append(f"serve_adapters={adapters}: 0 or more")
    if problems:
        raise ConfigError(problems)


def serve_plan(
    resolved: dict,
    device: Gpu,
    num_gpus: int = 1,
    headroom: float = 0.1,
    batch: int = 16,
    context: int | None = None,
    adapters: int | None = None,
    preset: str | None = None,
    notes: list | None = None,
) -> ServePlan:
    """The serving memory of a checked config (planning.checked_config's resolved dict) on `device`."""
    check_options(batch, context, adapters)
    arch = architecture(resolved["model"])
    strategy = resolved["strategy"]
    lora = adapter(resolved["model"], strategy, arch)
    if adapters and lora is None:
        raise ConfigError(f"serve_adapters={adapters}: strategy={strategy['name']} trains full weights, no adapter")
    adapters = (1 if lora else 0) if adapters is None else adapters
    context = context or arch.positions
    if arch.positions and context > arch.positions:
        raise ConfigError(
            f"serve_context={context}: {resolved['model']['name_or_path']} has a context of {arch.positions} tokens"
        )
    capacity = int(device.memory_gib * GIB) if device.memory_gib else None
    usable = int(capacity * (1 - headroom)) if capacity else None
    adapter_params = lora.trainable if lora else 0
    quantization = strategy.get("quantization") or {}
    double = bool(quantization.get("bnb_4bit_use_double_quant", True))
    result = ServePlan(
        preset=preset,
        gpu=device,
        num_gpus=num_gpus,
        model=resolved["model"]["name_or_path"],
        family=arch.family,
        strategy=strategy["name"],
        total_params=arch.total_params,
        layers=arch.layers,
        hidden=arch.hidden,
        batch=batch,
        context=context,
        adapters=adapters,
        adapter_params=adapter_params,
        kv_bytes_per_token=kv_bytes_per_token(arch, 2),
        capacity_bytes=capacity,
        usable_bytes=usable,
        default=default_choice(resolved, device),
        notes=list(notes or []),
    )
    for choice in CHOICES:
        result.choices.append(_choice(choice, arch, adapters * adapter_params, batch, context, device, usable, double))
    if device.key != "cpu" and device.bf16_tflops is None:
        result.notes.append(f"{device.name} has no bf16: serve in fp16 (dtype=float16) or quantized with quant=")
    if strategy["name"] == "qlora":
        result.notes.append(
            "a QLoRA adapter is served over its 4-bit base by default, as it trained (quant=none: full weights, "
            "outputs differ from training)"
        )
    return result


def kv_bytes_per_token(arch: Architecture, value_bytes: int) -> int:
    """K and V of every layer for one token: 2 x layers x hidden x bytes (GPT-Neo, GPT-J and NeoX cache full-width
    K and V; none of them groups heads)."""
    return 2 * arch.layers * arch.hidden * value_bytes


def weight_bytes(choice: str, arch: Architecture, double_quant: bool = True) -> tuple[int, int]:
    """(all weights, one layer's weights) in bytes for a choice."""
    linear = sum(i * o for (i, o) in arch.layer_linears.values())  # one layer's Linear weights, biases apart
    rows = sum(o for (_, o) in arch.layer_linears.values())
    if choice == "4bit":
        layer = int(linear * QLORA_BYTES_PER_PARAM[double_quant]) + (arch.layer_params - linear) * 2
    elif choice == "8bit":
        layer = linear + rows * INT8_SCALE_BYTES + (arch.layer_params - linear) * 2
    else:
        layer = arch.layer_params * VALUE_BYTES[choice]
    rest = (arch.total_params - arch.layers * arch.layer_params) * VALUE_BYTES[choice]  # embeddings, head, final norm
    return rest + arch.layers * layer, layer


def default_choice(resolved: dict, device: Gpu) -> str:
    """generate's default for a run of this config: a QLoRA run's own 4-bit base, else the run's model.dtype
    (auto: bf16 where the GPU has it)."""
    if resolved["strategy"]["name"] == "qlora":
        return "4bit"
    dtype = resolved["model"].get("dtype")
    if dtype in DTYPE_CHOICE:
        return DTYPE_CHOICE[dtype]
    return "fp32" if device.key == "cpu" else "bf16" if device.bf16_tflops else "fp16"


def _choice(
    choice: str,
    arch: Architecture,
    adapter_params: int,
    batch: int,
    context: int,
    device: Gpu,
    usable: int | None,
    double_quant: bool,
) -> ServeChoice:
    value = VALUE_BYTES[choice]
    weights, layer_weights = weight_bytes(choice, arch, double_quant)
    adapters = adapter_params * ADAPTER_BYTES
    per_sequence_kv = kv_bytes_per_token(arch, value) * context
    # prefill, per sequence: one layer's MLP input, intermediate and output, one layer's K and V copied while the cache
    # grows, the last position's logits
    per_sequence_prefill = (
        context * (arch.inner + 2 * arch.hidden) * value + per_sequence_kv // arch.layers + arch.vocab * LOGIT_BYTES
    )
    context_bytes = CUDA_CONTEXT_BYTES if device.key != "cpu" else 0
    total = weights + adapters + batch * (per_sequence_kv + per_sequence_prefill) + context_bytes
    fits = max_batch = gpus = None
    if usable:
        fits = total <= usable
        max_batch = max(0, (usable - context_bytes - weights - adapters) // (per_sequence_kv + per_sequence_prefill))
        embeddings = arch.embedding_params * value
        layer = layer_weights + adapters // arch.layers + batch * per_sequence_kv // arch.layers
        head = weights - embeddings - arch.layers * layer_weights
        gpus = _gpus_in_order(
            [embeddings, *[layer] * arch.layers, head], usable - context_bytes - batch * per_sequence_prefill
        )
    return ServeChoice(
        choice=choice,
        weights_bytes=weights,
        adapter_bytes=adapters,
        kv_cache_bytes=batch * per_sequence_kv,
        prefill_bytes=batch * per_sequence_prefill,
        context_bytes=context_bytes,
        total_bytes=total,
        fits=fits,
        max_batch=max_batch,
        gpus_needed=gpus,
    )


def _gpus_in_order(items: list[int], per_gpu: int) -> int | None:
    """GPUs needed to place `items` in order, each GPU filled before the next (accelerate's sequential placement)."""
    if per_gpu <= 0 or max(items) > per_gpu:
        return None
    gpus, used = 1, 0
    for item in items:
        if used + item > per_gpu:
            gpus, used = gpus + 1, 0
        used += item
    return gpus


def render(p: ServePlan) -> str:
    where = p.gpu.name if p.gpu.key != "cpu" else "CPU"
    limit = (
        f", {gib(p.capacity_bytes)} GiB (limit {gib(p.usable_bytes)} with "
        f"{1 - p.usable_bytes / p.capacity_bytes:.0%} headroom)"
        if p.capacity_bytes
        else ""
    )
    adapters = (
        f"{p.adapters} x {p.adapter_params:,} parameters ({p.strategy}, fp32 as peft loads them)"
        if p.adapters
        else "none"
    )
    out = [
        f"serve: {'conf=' + p.preset if p.preset else 'config'} on {where}{limit}",
        f"model: {p.model} ({p.family}): {p.total_params:,} parameters, {p.layers} layers x hidden {p.hidden}",
        f"adapters: {adapters}",
        (
            f"KV cache: 2 (K, V) x {p.layers} layers x {p.hidden} x 2 B = {p.kv_bytes_per_token:,} B per token (fp32: "
            f"x 2); {p.batch} sequence(s) x {p.context:,} tokens = {p.batch * p.context:,} tokens"
        ),
        "",
        f"  {'choice':<8}{'weights':>9}{'adapters':>10}{'KV cache':>10}{'prefill':>9}{'CUDA':>7}{'total':>8}"
        f"   {'one GPU':<9}{'max batch':>9}   device_map=auto",
    ]
    for c in p.choices:
        mark = "*" if c.choice == p.default else " "
        fits = "-" if c.fits is None else "fits" if c.fits else "no"
        out.append(
            f"  {c.choice + mark:<8}{gib(c.weights_bytes):>9}{gib(c.adapter_bytes):>10}{gib(c.kv_cache_bytes):>10}"
            f"{gib(c.prefill_bytes):>9}{gib(c.context_bytes):>7}{gib(c.total_bytes):>8}   {fits:<9}"
            f"{'-' if c.max_batch is None else c.max_batch:>9}   {_gpus(c, p)}"
        )
    out += [
        "  (GiB; * generate's default for a run of this preset; max batch: sequences of "
        f"{p.context:,} tokens on one GPU)",
    ]
    if p.notes:
        out += ["", "notes:"] + [f"  - {n}" for n in p.notes]
    return "\n".join(out)


def _gpus(c: ServeChoice, p: ServePlan) -> str:
    if p.gpu.key == "cpu":
        return "-"
    if c.gpus_needed is None:
        return "a layer alone exceeds one GPU"
    given = "" if c.gpus_needed <= p.num_gpus else f" (more than num_gpus={p.num_gpus})"
    return f"{c.gpus_needed} x {p.gpu.key}{given}"


def as_json(p: ServePlan) -> dict:
    import dataclasses

    data = dataclasses.asdict(p)
    for choice in data["choices"]:
        choice["total_gib"] = round(choice["total_bytes"] / GIB, 2)
    return data
