"""What stops a run cleanly: preemption signals, and the per-step record that proves a resume was exact.

- SIGTERM / SIGUSR1 (schedulers, spot instances) only set a flag. The trainer stops at the next optimizer step,
  commits a checkpoint and the CLI exits 75, so a scheduler can tell "requeue me" from success (transformers' own
  just-in-time checkpointing exits 0). Under DDP/DeepSpeed the ranks agree on the flag before stopping.
- train_steps.jsonl: per optimizer step, the loss and a short hash of every micro-batch's token ids, so an
  interrupted-and-resumed run can be compared step by step with an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import signal
import sys
from pathlib import Path

from transformers import TrainerCallback

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionSignals:
    """Install handlers that record the first preemption signal; restore the previous ones on exit.

    `deferred=True` (a distributed launch) leaves the default action (terminate) in place until `arm()`, called once
    the process group exists: before that, a SIGTERM comes from the launcher stopping the group because another rank
    failed (torchrun's way), and a process still waiting for that rank to join would otherwise wait out the launcher's
    30 s grace period before being killed."""

    def __init__(self, deferred: bool = False):
        self.received: str | None = None
        self.deferred = deferred
        self._previous = {}

    def __enter__(self):
        if not self.deferred:
            self.arm()
        return self

    def arm(self) -> None:
        for sig in PREEMPTION_SIGNALS:
            if sig not in self._previous:
                self._previous[sig] = signal.signal(sig, self._handle)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.received is None:
            self.received = signal.Signals(signum).name
            line = (
                f"[finetune] {self.received} received: stopping at the next safe point (in training: after this "
                "optimizer step, saving a checkpoint)"
            )
            print(line, file=sys.stderr, flush=True)
            from finetune import console as cli

            cli.transcript(line)


def before_training(signal_name: str, phase: str) -> str:
    """The Preempted message for a signal that arrived before the first optimizer step."""
    return (
        f"{signal_name}: stopped during {phase}, before this attempt's first optimizer step: nothing new was "
        "trained and no checkpoint was written or changed; run the same command again (with resume=auto it "
        "continues from the newest complete checkpoint when there is one)"
    )


class StopBeforeTraining(TrainerCallback):
    """The evaluation before training (loss of the untouched base) is the longest phase before the first step: a
    preemption signal ends it at the next evaluation batch instead of after it, a sample generation and a step."""

    def __init__(self, signals: PreemptionSignals):
        self.signals = signals

    def on_prediction_step(self, args, state, control, **kwargs):
        if state.global_step == 0 and self.signals.received:
            from finetune.errors import Preempted

            raise Preempted(before_training(self.signals.received, "the evaluation before training"))


class StopOnPreemption(TrainerCallback):
    """At each optimizer step end: if any rank got a signal, save now and stop."""

    def __init__(self, signals: PreemptionSignals):
        self.signals = signals

    def on_step_end(self, args, state, control, **kwargs):
        if _any_rank(self.signals.received is not None):
            control.should_save = True
            control.should_training_stop = True


def _any_rank(flag: bool) -> bool:
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    value = torch.tensor([int(flag)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


class StepLog:
    """Accumulates micro-batch hashes and losses; `flush(step)` appends one line per optimizer step."""

    def __init__(self, path: Path, resume_step: int = 0, enabled: bool = True):
        self.path, self.enabled = path, enabled
        self.batches: list[str] = []
        self.loss = 0.0
        if enabled and path.exists():  # steps after the resumed checkpoint are replayed: drop their old lines
            kept = [
                line
                for line in path.read_text(encoding="utf-8").splitlines()
                if json.loads(line)["step"] <= resume_step
            ]
            path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        elif enabled:
            path.write_text("", encoding="utf-8")

    def add(self, input_ids, loss: float) -> None:
        self.batches.append(hashlib.sha1(input_ids.cpu().numpy().tobytes()).hexdigest()[:12])
        self.loss += loss

    def flush(self, step: int) -> None:
        if self.enabled and self.batches:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, "loss": self.loss, "batches": self.batches}) + "\n")
        self.batches, self.loss = [], 0.0


class FlushStepLog(TrainerCallback):
    def __init__(self, log: StepLog):
        self.log = log

    def on_step_end(self, args, state, control, **kwargs):
        self.log.flush(state.global_step)


class OnTrainBegin(TrainerCallback):
    """Run `fn()` once the Trainer has wrapped the model (DDP / DeepSpeed engine), before the first step."""

    def __init__(self, fn):
        self.fn = fn

    def on_train_begin(self, args, state, control, **kwargs):
        self.fn()
