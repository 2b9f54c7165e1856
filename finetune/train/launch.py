"""The distributed launch around a run (`accelerate launch` / torchrun, conf/distributed/). Every rank runs the same
run on the same output_dir, so: the ranks must agree on what they train, DeepSpeed's communication must exist
before ZeRO-3 loads the weights, and the process group must end while Python is still whole."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from finetune.errors import ConfigError


@contextlib.contextmanager
def closed_on_error() -> Iterator[None]:
    """After an error (already in run.json: this is entered before run_record, so it leaves after it), close
    this rank's side of a distributed launch's process group (leave_process_group). A run that ends well leaves it
    after the preemption handlers are restored: the run calls leave_process_group(wait=True) last."""
    try:
        yield
    except BaseException:
        leave_process_group(wait=False)
        raise


def leave_process_group(wait: bool) -> None:
    """End a distributed launch's process group while Python is still whole. Left to interpreter teardown, gloo's
    worker threads can still hold tensors when the interpreter is half gone: the rank dies with SIGABRT ("terminate
    called without an active exception") after a finished run, and torchrun reports the launch failed (seen in CI on
    a ZeRO-3 resume; pytorch/pytorch#190489). `wait`: on success, every rank first waits for rank 0's last writes,
    so none tears down a connection another is still using; after an error, a peer may never arrive, so only this
    rank's side is closed."""
    import sys

    if "torch.distributed" not in sys.modules:  # a single-process run never imported it
        return
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if wait:
        dist.barrier()
        dist.destroy_process_group()
        return
    with contextlib.suppress(Exception):  # the error being raised is the one to report, not a teardown's
        dist.destroy_process_group()


def start_deepspeed_comm() -> None:
    """On CPU, accelerate starts torch.distributed (gloo) but not deepspeed.comm, and ZeRO-3's zero.Init inside
    from_pretrained then sizes its batch for one process and fails ("train_batch_size ... 8 != 2 * 2 * 1"). This wraps
    the existing process group; on GPUs accelerate has already done it and this is a no-op."""
    import deepspeed

    deepspeed.init_distributed()


def same_on_every_rank(summary: str) -> None:
    """Ranks that disagree on the config, the data or the checkpoint would train different things (or wait for each
    other forever): compare once, and let every rank stop with the same error."""
    import torch.distributed as dist

    summaries = [None] * dist.get_world_size()
    dist.all_gather_object(summaries, summary)
    if len(set(summaries)) > 1:
        raise ConfigError(
            f"the ranks of this launch disagree ({'; '.join(f'rank {i}: {s}' for i, s in enumerate(summaries))}); "
            "every rank must see the same config, data files and run directory"
        )
