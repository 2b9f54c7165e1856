"""Out of memory, explained: which of this run's settings to change, and what became of its checkpoints.

A CUDA out-of-memory error ends a run with a long traceback that names an allocation size, not the setting behind
it. Here it becomes an `OutOfMemory` error (run.json `failed:oom`, exit 1) whose message lists this run's own
fixes, cheapest first, with the values to use (finetune.plan.fixes: the planner's list): a smaller micro-batch with more
accumulation (the same effective batch), gradient checkpointing, a quantized base, a shorter max_length, adapters
instead of full fine-tuning, ZeRO-3 over more GPUs; during evaluation, the eval batch first. Nothing is
written or deleted on the way out, so committed checkpoints stay valid and `resume=true` continues once it fits.
`python -m finetune.plan` with the same arguments estimates the memory of each fix before any weights load.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from finetune.errors import OutOfMemory

_MESSAGES = ("out of memory", "can't allocate memory")  # CUDA / MPS / NCCL RuntimeErrors; torch's CPU allocator
_EVALUATION_FRAMES = frozenset({"evaluation_loop", "prediction_step", "evaluate"})  # transformers.Trainer's


def is_out_of_memory(err: BaseException) -> bool:
    """torch.OutOfMemoryError (CUDA), a RuntimeError that says it ran out (MPS, NCCL, CPU allocator), MemoryError."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(err, torch.OutOfMemoryError):
        return True
    return isinstance(err, MemoryError) or (isinstance(err, RuntimeError) and any(m in str(err) for m in _MESSAGES))


@contextlib.contextmanager
def explained(
    cfg, checkpoints_dir: Path, step: Callable[[], int] | None = None, loading: bool = False
) -> Iterator[None]:
    """Turn an out-of-memory error raised inside into OutOfMemory. `step()`: optimizer steps done (inside the training
    loop); `loading`: the weights are being read."""
    try:
        yield
    except BaseException as err:
        if not is_out_of_memory(err):
            raise
        phase = "load" if loading else "eval" if _in_evaluation(err) else "train"
        raise OutOfMemory(message(cfg, _when(phase, step() if step else None), err, checkpoints_dir, phase)) from err


def _when(phase: str, done: int | None) -> str:
    if phase == "load":
        return "while loading the model"
    if done is None:
        return "in an evaluation before or after training" if phase == "eval" else "before or after the training loop"
    return f"in the evaluation after optimizer step {done}" if phase == "eval" else f"in optimizer step {done + 1}"


def message(cfg, where: str, err: BaseException, checkpoints_dir: Path, phase: str) -> str:
    """What ran out and when, what became of the checkpoints, and this run's fixes (phase: load | train | eval)."""
    said = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
    saved = sorted(checkpoints_dir.glob("checkpoint-*")) if checkpoints_dir.is_dir() else []
    kept = (
        f"the checkpoints committed in {checkpoints_dir} are intact; after the change, run the same command with "
        "resume=true"
        if saved
        else "no checkpoint had been committed yet"
    )
    lines = [f"out of memory {where}: {said}", f"Nothing was lost: {kept}.", "Ways to fit, cheapest first:"]
    lines += [f"  - {fix}" for fix in fixes(cfg, phase)]
    lines.append(
        "  - `python -m finetune.plan` with the same arguments (gpu=..., num_gpus=...) estimates the peak memory "
        "of each before any weights load"
    )
    return "\n".join(lines)


def fixes(cfg, phase: str) -> list[str]:
    """The overrides that lower this run's peak memory at `phase` (load | train | eval), with their values, cheapest
    first: the first of each kind from finetune.plan.fixes, the list the planner re-plans."""
    from finetune import ranks
    from finetune.plan.fixes import Facts, for_run
    from finetune.plan.setup import sharding

    trainer, distributed = cfg.trainer, cfg.get("distributed") or {}
    sharded = sharding(distributed)[0] == 3
    facts = Facts(
        strategy=cfg.strategy.name,
        micro_batch=int(trainer.get("per_device_train_batch_size") or 8),
        grad_accum=int(trainer.get("gradient_accumulation_steps") or 1),
        checkpointing=bool(trainer.get("gradient_checkpointing") or trainer.get("activation_checkpointing")),
        max_length=cfg.data.get("max_length"),
        cuda=True,  # advice for an accelerator's memory (a CPU run that runs out gets the same list)
        num_gpus=ranks.world_size(),
        sharded=("FSDP" if distributed.get("backend") == "fsdp" else "DeepSpeed ZeRO-3") if sharded else "",
        eval_batch=int(trainer.get("per_device_eval_batch_size") or 8),
    )
    return [fix.advice for fix in for_run(facts, phase)]


def _in_evaluation(err: BaseException) -> bool:
    tb = err.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name in _EVALUATION_FRAMES:
            return True
        tb = tb.tb_next
    return False
