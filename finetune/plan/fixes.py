"""Ways to make a training run fit in memory, cheapest first: one list for the planner and the out-of-memory message.

The planner (finetune.plan.suggestions) re-plans every candidate and shows the first of each kind that fits; a run
that ran out (finetune.train.oom) lists the first of each kind that applies to the part that ran out, with its values.

Cheapest first: the same training (a smaller micro-batch with more accumulation: the same global batch; gradient
checkpointing: recomputation), then a 4-bit base, more GPUs (ZeRO-3), CPU offload, shorter samples (they change the
data) and last adapters instead of every weight (it changes what is trained). A run that ran out is on the machine
it has: there the fixes that need more GPUs come last, where the planner, which is choosing the machine, ranks them
before changes to the data. Cheap to import (no torch, no Hydra): training imports it when it runs out of memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

MIN_MAX_LENGTH = 128
GPU_COUNTS = (2, 4, 8, 16, 32, 64)
PHASES = ("plan", "load", "train", "eval")  # plan: before any run; the others: the part of a run that ran out
RESUME_DRIFT = "resume_allow_drift=[per_device_train_batch_size,gradient_accumulation_steps]"


@dataclass(frozen=True)
class Facts:
    """What of a run decides which fixes apply, and their values."""

    strategy: str
    micro_batch: int
    grad_accum: int
    checkpointing: bool
    max_length: int | None
    cuda: bool = True
    num_gpus: int = 1
    sharded: str = ""
    """The name of the sharding that already splits the weights over the GPUs (ZeRO-3, FSDP full shard), or ""."""
    offloaded: bool = False
    """Optimizer state and parameters are both in CPU memory already."""
    eval_batch: int | None = None


@dataclass(frozen=True)
class Fix:
    kind: str
    change: str
    """What it does, in the planner's list."""
    overrides: tuple
    """The overrides that make it (with the planner's num_gpus=N when it needs more GPUs)."""
    note: str
    """What it costs, in the planner's list."""
    advice: str
    """Its line in the out-of-memory message: the overrides and what they mean for the run."""
    num_gpus: int
    """The GPUs it runs on."""
    settings: dict = field(default_factory=dict)
    """Config keys it sets: section.key -> value."""
    groups: dict = field(default_factory=dict)
    """Config groups it selects: group -> option (strategy -> qlora, distributed -> zero3)."""
    for_runs: bool = True
    """Offered after a run ran out. CPU offload is not: what it costs (host RAM, a several times slower step) takes
    the planner's numbers, which the message points to."""


def candidates(facts: Facts, phase: str = "plan") -> Iterator[Fix]:
    """Every fix that applies to `facts` at `phase`, cheapest first; several of a kind (smaller micro-batches, more
    GPUs, shorter samples) in the order to try them."""
    if phase not in PHASES:
        raise ValueError(f"phase {phase!r}: one of {', '.join(PHASES)}")
    steps = phase != "load"  # batch, recomputation and length change nothing while the weights load
    micro, accum, gpus = facts.micro_batch, facts.grad_accum, facts.num_gpus
    if phase == "eval" and (facts.eval_batch or 0) > 1:
        half = facts.eval_batch // 2
        yield Fix(
            "eval-batch",
            f"evaluation micro-batch {half}",
            (f"trainer.per_device_eval_batch_size={half}",),
            "",
            f"trainer.per_device_eval_batch_size={half} (evaluation only; training is unchanged)",
            gpus,
            settings={"trainer.per_device_eval_batch_size": half},
        )
    for batch in dict.fromkeys(b for b in (micro // 2, micro // 4, micro // 8, 1) if 1 <= b < micro and micro % b == 0):
        if not steps:
            break
        more = accum * (micro // batch)
        overrides = (f"trainer.per_device_train_batch_size={batch}", f"trainer.gradient_accumulation_steps={more}")
        yield Fix(
            "micro-batch",
            f"micro-batch {batch} x {more} accumulation (same global batch)",
            overrides,
            "",
            f"{' '.join(overrides)} (the same effective batch; a resume also needs {RESUME_DRIFT})",
            gpus,
            settings={"trainer.per_device_train_batch_size": batch, "trainer.gradient_accumulation_steps": more},
        )
    if steps and not facts.checkpointing:
        yield Fix(
            "checkpointing",
            "gradient checkpointing on",
            ("trainer.gradient_checkpointing=true",),
            "~1/3 more compute",
            "trainer.gradient_checkpointing=true (about 30% slower; keeps one layer's activations at a time; resumes "
            "as is)",
            gpus,
            settings={"trainer.gradient_checkpointing": True},
        )
        if micro > 1:
            overrides = (
                "trainer.gradient_checkpointing=true",
                "trainer.per_device_train_batch_size=1",
                f"trainer.gradient_accumulation_steps={accum * micro}",
            )
            yield Fix(
                "checkpointing",
                f"gradient checkpointing + micro-batch 1 x {accum * micro}",
                overrides,
                "",
                f"{' '.join(overrides)} (about 30% slower, the same effective batch; a resume also needs "
                f"{RESUME_DRIFT})",
                gpus,
                settings={
                    "trainer.gradient_checkpointing": True,
                    "trainer.per_device_train_batch_size": 1,
                    "trainer.gradient_accumulation_steps": accum * micro,
                },
            )
    if facts.strategy in ("lora", "dora") and facts.cuda:
        yield Fix(
            "qlora",
            "QLoRA (4-bit NF4 base)",
            ("strategy=qlora",),
            "needs bitsandbytes; slower per step",
            "strategy=qlora (a 4-bit base: about a quarter of the weight memory; a new run)",
            gpus,
            groups={"strategy": "qlora"},
        )
    if facts.cuda:
        yield from _more_gpus(facts)
    if phase == "plan" and facts.cuda and not facts.offloaded:
        yield Fix(
            "offload",
            "DeepSpeed ZeRO-3 with optimizer and parameters offloaded to CPU",
            ("distributed=zero3_offload",),
            "much slower: CPU Adam and PCIe bound",
            "distributed=zero3_offload (optimizer state and parameters in CPU memory: several times slower; a new run)",
            gpus,
            groups={"distributed": "zero3_offload"},
            for_runs=False,
        )
    length = (facts.max_length or 0) // 2
    while steps and length >= MIN_MAX_LENGTH:
        yield Fix(
            "max_length",
            f"data.max_length={length}",
            (f"data.max_length={length}",),
            "changes the data: longer rows are dropped or cut (data.overlength)",
            f"data.max_length={length} (data.overlength says what happens to longer samples; other samples: a new run)",
            gpus,
            settings={"data.max_length": length},
        )
        length //= 2
    if facts.strategy == "full":
        yield Fix(
            "lora",
            "LoRA adapters instead of every weight",
            ("strategy=lora",),
            "changes what is trained",
            "strategy=lora (adapters only: no optimizer state for the base weights; a new run)",
            gpus,
            groups={"strategy": "lora"},
        )


def _more_gpus(facts: Facts) -> Iterator[Fix]:
    name = facts.sharded or "DeepSpeed ZeRO-3"
    switch = () if facts.sharded else ("distributed=zero3",)
    for gpus in (n for n in GPU_COUNTS if n > facts.num_gpus):
        advice = (
            f"more GPUs (accelerate launch --num_processes {gpus}): {facts.sharded} shards weights, gradients and "
            "optimizer state over all of them"
            if facts.sharded
            else "distributed=zero3 across several GPUs (weights, gradients and optimizer state sharded)"
        )
        yield Fix(
            "gpus",
            f"{name} on {gpus} GPUs",
            (*switch, f"num_gpus={gpus}"),
            f"accelerate launch --num_processes {gpus}",
            advice,
            gpus,
            groups={} if facts.sharded else {"distributed": "zero3"},
        )


def for_run(facts: Facts, phase: str) -> list[Fix]:
    """After a run ran out at `phase` (load, train or eval): the first fix of each kind that applies, cheapest first,
    those that need more GPUs than the run has last."""
    first: dict[str, Fix] = {}
    for fix in candidates(facts, phase):
        if fix.for_runs:
            first.setdefault(fix.kind, fix)
    return sorted(first.values(), key=lambda fix: fix.num_gpus > facts.num_gpus)
