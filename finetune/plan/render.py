"""The printed report of a plan, its JSON, and the one-line summary preset headers carry."""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

from finetune.plan.memory import GIB, gib

if TYPE_CHECKING:
    from finetune.plan.planning import Plan


def render(p: Plan) -> str:
    where = f"{p.num_gpus} x {p.gpu.name}" if p.gpu.key != "cpu" else "CPU"
    memory = f", {gib(p.capacity_bytes)} GiB" if p.capacity_bytes else ""
    peak = f", {tflops(p.peak_tflops)} TFLOPs dense" if p.peak_tflops else ""
    out = [
        f"plan: {'conf=' + p.preset if p.preset else 'config'} on {where}{memory}{peak}",
        f"model: {p.model} ({p.family}; architecture from {p.architecture_source}): {p.total_params:,} parameters",
        f"strategy: {p.strategy}: {p.trainable_params:,} trainable ({p.trainable_params / p.total_params:.2%})",
        (
            f"batch: {p.micro_batch} x {p.max_length} tokens per micro-batch, {p.grad_accum} accumulation steps x "
            f"{p.num_gpus} GPU(s) = {p.tokens_per_step:,} tokens per optimizer step; gradient checkpointing "
            f"{'on' if p.checkpointing else 'off'}; {p.precision}; optimizer {p.optimizer}; "
            f"distributed: {p.distributed}"
        ),
        "",
        f"memory per {'GPU' if p.gpu.key != 'cpu' else 'process'}{'':<29}GiB",
    ]
    for line in p.memory:
        out.append(f"  {line.name:<34}{gib(line.bytes):>8}   {line.detail}")
    out.append(f"  {'total':<34}{gib(p.total_bytes):>8}   " + verdict(p))
    other = p.activations_without_checkpointing if p.checkpointing else p.activations_with_checkpointing
    out.append(f"  (activations {'without' if p.checkpointing else 'with'} gradient checkpointing: {gib(other)} GiB)")
    if p.cpu_offload_bytes:
        out.append(f"  CPU RAM for offloaded state: {gib(p.cpu_offload_bytes)} GiB per GPU (x GPUs per node)")
    out += ["", "time"]
    out.append(f"  FLOPs per token: {p.flops_per_token:.3g} ({p.flops_terms})")
    if p.tokens_per_second:
        out.append(
            f"  at {p.mfu:.0%} of {tflops(p.peak_tflops)} TFLOPs x {p.num_gpus}: {p.tokens_per_second:,.0f} tokens/s; "
            f"{_duration(p.step_seconds)} per optimizer step"
        )
        out.append(f"  run: {_duration(p.run_seconds)} " + (p.run_basis if p.run_steps is None else f"({p.run_basis})"))
    else:
        out.append("  tokens/s: not estimated on CPU")
    if p.suggestions:
        out += ["", "to make it fit (each re-planned; cheapest first):"]
        for s in p.suggestions:
            bound = "at most " if s.cpu_offload_bytes else ""
            speed = f", {bound}{s.tokens_per_second:,.0f} tokens/s" if s.tokens_per_second else ""
            speed += f", {gib(s.cpu_offload_bytes)} GiB of CPU RAM per GPU" if s.cpu_offload_bytes else ""
            mark = "fits" if s.fits else "still too large"
            note = f"  [{s.note}]" if s.note else ""
            out.append(f"  - {s.change}: {gib(s.total_bytes)} GiB per GPU, {mark}{speed}{note}")
            out.append(f"      {' '.join(s.overrides)}")
    if p.notes:
        out += ["", "notes:"] + [f"  - {n}" for n in p.notes]
    return "\n".join(out)


def verdict(p: Plan) -> str:
    if p.fits is None:
        return "(CPU: compare with the free RAM)"
    headroom = 1 - p.usable_bytes / p.capacity_bytes
    limit = f"of {gib(p.capacity_bytes)} GiB (limit {gib(p.usable_bytes)} with {headroom:.0%} headroom)"
    return f"{limit}: {'fits' if p.fits else 'does NOT fit'}"


def as_json(p: Plan) -> dict:
    data = dataclasses.asdict(p)
    data["total_gib"] = round(p.total_bytes / GIB, 2)
    return data


def summary(p: Plan) -> str:
    """The one-line result the preset headers carry."""
    shape = f"{p.micro_batch} x {p.max_length}"
    if p.gpu.key == "cpu":
        return f"{gib(p.total_bytes)} GiB of RAM at {shape}; time not estimated on CPU"
    fit = "fits" if p.fits else "does not fit"
    speed = f"; ~{_round_speed(p.tokens_per_second):,} tokens/s at {p.mfu:.0%} MFU" if p.tokens_per_second else ""
    return f"{gib(p.total_bytes)} GiB of {gib(p.capacity_bytes)} GiB per GPU at {shape}, {fit}{speed}"


def _round_speed(value: float) -> int:
    digits = max(0, int(math.log10(value)) - 1) if value >= 100 else 0
    return int(round(value, -digits))


def gib_or_dash(value: float | None) -> str:
    return "-" if value is None else f"{value:g} GiB"


def tflops(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
