"""The plan: memory per GPU and time of a composed config on `num_gpus` x a GPU, from the architecture alone.

plan_preset composes `conf=PRESET` with overrides as training does; plan validates a composed config
(finetune.plan.checks); plan_resolved puts the pieces together: the architecture and the adapter
(finetune.plan.architecture), the settings (setup), memory (memory, activations), time (throughput) and, when it does
not fit, the changes that make it fit (suggestions). It fits when the total stays under the GPU's memory less
`headroom`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from finetune.config import precision
from finetune.errors import ConfigError
from finetune.plan import serving
from finetune.plan.activations import activations
from finetune.plan.architecture import adapter, architecture
from finetune.plan.checks import checked_config, setup_notes
from finetune.plan.hardware import Gpu, find_gpu
from finetune.plan.memory import GIB, MemoryLine, memory_lines
from finetune.plan.serving import ServePlan
from finetune.plan.setup import distributed_name, precision_name, setup_of
from finetune.plan.suggestions import suggestions
from finetune.plan.throughput import flops_per_token, peak_tflops, run_length


@dataclass
class Plan:
    preset: str | None
    gpu: Gpu
    num_gpus: int
    model: str
    architecture_source: str
    family: str
    strategy: str
    total_params: int
    trainable_params: int
    micro_batch: int
    max_length: int
    grad_accum: int
    checkpointing: bool
    precision: str
    optimizer: str
    distributed: str
    memory: list
    """Per GPU (per process on CPU): MemoryLine entries that sum to total_bytes."""
    total_bytes: int
    capacity_bytes: int | None
    usable_bytes: int | None
    fits: bool | None
    activations_without_checkpointing: int
    activations_with_checkpointing: int
    activation_peak_at: str
    activations_kept_after_forward: int
    cpu_offload_bytes: int
    flops_per_token: float
    flops_terms: str
    peak_tflops: float | None
    mfu: float
    tokens_per_second: float | None
    tokens_per_step: int
    step_seconds: float | None
    run_steps: int | None
    run_tokens: int
    run_seconds: float | None
    run_basis: str
    suggestions: list = field(default_factory=list)
    notes: list = field(default_factory=list)


def plan_preset(
    preset: str,
    overrides: list[str],
    gpu: str = "h100-80gb",
    num_gpus: int = 1,
    mfu: float = 0.4,
    headroom: float = 0.1,
    format: str = "text",
) -> Plan:
    """Compose `conf=preset` with overrides as training does, then plan it."""
    find_gpu(gpu)  # an unknown GPU fails before any composition
    check_options(num_gpus, mfu, headroom)
    return plan(compose_preset(preset, overrides), gpu, num_gpus, mfu, headroom, preset=preset)


def serve_preset(
    preset: str,
    overrides: list[str],
    gpu: str = "h100-80gb",
    num_gpus: int = 1,
    headroom: float = 0.1,
    batch: int = 16,
    context: int | None = None,
    adapters: int | None = None,
) -> ServePlan:
    """Compose `conf=preset` with overrides as training does, then plan serving its model (finetune.plan.serving)."""
    device = find_gpu(gpu)
    check_options(num_gpus, 0.4, headroom)
    serving.check_options(batch, context, adapters)
    resolved, notes = checked_config(compose_preset(preset, overrides))
    return serving.serve_plan(resolved, device, num_gpus, headroom, batch, context, adapters, preset, notes)


def compose_preset(preset: str, overrides: list[str]):
    """`conf=preset` with overrides, composed as training composes it; ConfigError naming what does not compose."""
    from hydra.errors import ConfigCompositionException, MissingConfigException

    from finetune.config.compose import compose_with_overrides, preflight, presets

    if preset not in presets():
        raise ConfigError(preflight(preset, overrides)[0])
    try:
        cfg, _ = compose_with_overrides(preset, overrides)
    except (ConfigCompositionException, MissingConfigException):
        raise ConfigError(
            preflight(preset, overrides)[0] or [f"cannot compose conf={preset} with {overrides}"]
        ) from None
    return cfg


def plan(
    cfg,
    gpu: str = "h100-80gb",
    num_gpus: int = 1,
    mfu: float = 0.4,
    headroom: float = 0.1,
    preset: str | None = None,
    suggest: bool = True,
) -> Plan:
    """The memory and time plan of a composed config (a DictConfig from finetune.config.compose, or its resolved
    dict) on `num_gpus` x `gpu`. Validates it as training does; raises ConfigError naming every problem."""
    device = find_gpu(gpu)
    check_options(num_gpus, mfu, headroom)
    resolved, notes = checked_config(cfg)
    return plan_resolved(resolved, device, num_gpus, mfu, headroom, preset, notes, suggest)


def check_options(num_gpus: int, mfu: float, headroom: float) -> None:
    problems = []
    if num_gpus < 1:
        problems.append(f"num_gpus={num_gpus}: must be 1 or more")
    if not 0 < mfu <= 1:
        problems.append(f"mfu={mfu}: a share of the peak, in (0, 1], e.g. mfu=0.4")
    if not 0 <= headroom < 1:
        problems.append(f"headroom={headroom}: a share of the GPU's memory, in [0, 1), e.g. headroom=0.1")
    if problems:
        raise ConfigError(problems)


def plan_resolved(
    resolved: dict,
    device: Gpu,
    num_gpus: int,
    mfu: float,
    headroom: float,
    preset: str | None = None,
    notes: list | None = None,
    suggest: bool = True,
) -> Plan:
    notes = list(notes or [])
    resolved = copy.deepcopy(resolved)
    if precision.resolve(resolved, bf16=device.key != "cpu" and device.bf16_tflops is not None):  # auto: by the target
        notes.append(f"precision auto on {device.name}: {precision.describe(resolved)}")
    arch = architecture(resolved["model"])
    adapter_ = adapter(resolved["model"], resolved["strategy"], arch)
    setup = setup_of(resolved, device)
    notes += setup_notes(arch, setup, device, num_gpus, resolved)
    lines, cpu_bytes = memory_lines(arch, adapter_, setup, num_gpus)
    acts = activations(arch, adapter_, setup)
    where = "gradient checkpointing on" if setup.checkpointing else "gradient checkpointing off"
    lines.insert(
        _after_optimizer(lines),
        MemoryLine(
            "activations",
            acts.peak,
            f"{setup.forward_rows} x {setup.max_length} tokens, {where}; peak at {acts.peak_at}",
        ),
    )
    total = sum(line.bytes for line in lines)
    capacity = int(device.memory_gib * GIB) if device.memory_gib else None
    usable = int(capacity * (1 - headroom)) if capacity else None
    flops, terms = flops_per_token(arch, adapter_, setup)
    peak = peak_tflops(device, setup)
    tokens_per_second = mfu * peak * 1e12 * num_gpus / flops if peak else None
    tokens_per_step = setup.forward_rows * setup.grad_accum * num_gpus * setup.max_length
    steps, run_tokens, basis = run_length(resolved, setup, num_gpus)
    result = Plan(
        preset=preset,
        gpu=device,
        num_gpus=num_gpus,
        model=resolved["model"]["name_or_path"],
        architecture_source=arch.source,
        family=arch.family,
        strategy=setup.strategy,
        total_params=arch.total_params + (adapter_.trainable if adapter_ else 0),
        trainable_params=adapter_.trainable if adapter_ else arch.total_params,
        micro_batch=setup.micro_batch,
        max_length=setup.max_length,
        grad_accum=setup.grad_accum,
        checkpointing=setup.checkpointing,
        precision=precision_name(setup),
        optimizer=setup.optimizer,
        distributed=distributed_name(setup),
        memory=lines,
        total_bytes=total,
        capacity_bytes=capacity,
        usable_bytes=usable,
        fits=(total <= usable) if usable else None,
        activations_without_checkpointing=acts.without_checkpointing,
        activations_with_checkpointing=acts.with_checkpointing,
        activation_peak_at=acts.peak_at,
        activations_kept_after_forward=acts.kept_after_forward,
        cpu_offload_bytes=cpu_bytes,
        flops_per_token=flops,
        flops_terms=terms,
        peak_tflops=peak,
        mfu=mfu,
        tokens_per_second=tokens_per_second,
        tokens_per_step=tokens_per_step,
        step_seconds=tokens_per_step / tokens_per_second if tokens_per_second else None,
        run_steps=steps,
        run_tokens=run_tokens,
        run_seconds=run_tokens / tokens_per_second if tokens_per_second else None,
        run_basis=basis,
        notes=notes,
    )
    if suggest and result.fits is False:
        result.suggestions = suggestions(
            resolved,
            setup,
            num_gpus,
            lambda changed, gpus: plan_resolved(changed, device, gpus, mfu, headroom, suggest=False),
        )
    return result


def _after_optimizer(lines: list) -> int:
    return next(i for i, line in enumerate(lines) if line.name == "optimizer states") + 1
