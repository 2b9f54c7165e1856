"""Fault injection for the reliability tests: `python tests/reliability/fault.py FAULT STEP [overrides...]`.

Runs the real CLI (`finetune.__main__.main`) in this process after wrapping one function, so that a signal or
SIGKILL hits the process the way it does in production:
- KILL STEP:    SIGKILL during the first micro-batch after optimizer step STEP (mid-epoch, between checkpoints)
- TERM / USR1 STEP: send that signal to ourselves at the same point (a scheduler's preemption)
- KILL_IN_SAVE STEP: SIGKILL while checkpoint-STEP is staged, after its files are written, before its manifest
- KILL_AFTER_SAVE STEP: SIGKILL right after checkpoint-STEP is committed (the last one: before the final adapter)
- OOM STEP:     the CUDA out-of-memory error torch raises, from the first micro-batch after optimizer step STEP
- KILL_IN_DATA 0 / KILL_IN_EVAL 0: SIGKILL as data preparation / the evaluation before training starts
- KILL_IN_FINAL_SAVE 0: SIGKILL once the final adapter's weights are written, before its card and manifest
- KILL_IN_CARD 0: SIGKILL while the final adapter's model card is written
- TERM_IN_DATA 0: SIGTERM as data preparation starts (before the model loads)
- TERM_IN_EVAL 0: SIGTERM as the evaluation before training starts
"""

import os
import signal
import sys

from finetune.runs import checkpoints
from finetune.train import trainer as guarded

fault, at, overrides = sys.argv[1], int(sys.argv[2]), sys.argv[3:]

if fault == "KILL_IN_SAVE":
    write_manifest = checkpoints.write_manifest

    def dying_write_manifest(directory, **facts):
        if facts.get("step") == at:
            os.kill(os.getpid(), signal.SIGKILL)
        return write_manifest(directory, **facts)

    checkpoints.write_manifest = dying_write_manifest
elif fault == "KILL_AFTER_SAVE":
    commit = checkpoints.commit

    def dying_commit(staged, final):
        commit(staged, final)
        if checkpoints.step_of(final) == at:
            os.kill(os.getpid(), signal.SIGKILL)

    checkpoints.commit = dying_commit
elif fault in ("KILL_IN_DATA", "KILL_IN_EVAL", "KILL_IN_FINAL_SAVE", "KILL_IN_CARD"):
    import finetune.train.run as training

    def dying(function, when=lambda *args, **kwargs: True):
        def wrapper(*args, **kwargs):
            if when(*args, **kwargs):
                os.kill(os.getpid(), signal.SIGKILL)
            return function(*args, **kwargs)

        return wrapper

    if fault == "KILL_IN_DATA":
        training.objectives.prepare = dying(training.objectives.prepare)
    elif fault == "KILL_IN_EVAL":
        guarded.Guards.evaluate = dying(
            lambda self, *a, **k: super(guarded.Guards, self).evaluate(*a, **k),
            lambda self, *a, **k: self.state.global_step == 0,
        )
    elif fault == "KILL_IN_FINAL_SAVE":  # the final folder is cleaned right after trainer.save_model wrote it
        training.artifacts.clean_weights_folder = dying(
            training.artifacts.clean_weights_folder, lambda folder, *a, **k: "checkpoint" not in str(folder)
        )
    else:
        training.card.write = dying(training.card.write)
elif fault == "TERM_IN_DATA":
    import finetune.train.run as training

    prepare = training.objectives.prepare

    def signalled_prepare(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return prepare(*args, **kwargs)

    training.objectives.prepare = signalled_prepare
elif fault == "TERM_IN_EVAL":

    def signalled_evaluate(self, *args, **kwargs):
        if self.state.global_step == 0:
            os.kill(os.getpid(), signal.SIGTERM)
        return super(guarded.Guards, self).evaluate(*args, **kwargs)

    guarded.Guards.evaluate = signalled_evaluate
elif fault == "OOM":
    import torch

    training_step = guarded.Guards.training_step

    def running_out(self, *args, **kwargs):
        if self.state.global_step == at:
            raise torch.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB"
            )
        return training_step(self, *args, **kwargs)

    guarded.Guards.training_step = running_out
else:
    training_step = guarded.Guards.training_step

    def faulty_training_step(self, model, inputs, num_items_in_batch=None):
        if self.state.global_step == at:
            os.kill(os.getpid(), getattr(signal, f"SIG{fault}"))
        return training_step(self, model, inputs, num_items_in_batch)

    guarded.Guards.training_step = faulty_training_step

from finetune.cli import main  # noqa: E402 - after the fault is in place

main(overrides)
