"""FSDP2 on CPU process groups too: accelerate 1.15 leaves the plugin out there, and the run silently becomes DDP.

accelerate turns FSDP on only for GPU-type process groups: in `AcceleratorState.__init__` the FSDP branch sits under
`elif distributed_type in [MULTI_GPU, MULTI_NPU, MULTI_XPU, ...]`, which leaves out MULTI_CPU. On CPU it drops the
plugin without a word, the Trainer sees `is_fsdp_enabled=False` and wraps plain DDP: every rank holds the whole model.
(Measured: rc 0, 0 of 84 parameters sharded, an adapter bit-identical to the DDP run's.)

`enable_on_cpu(trainer)` finishes what accelerate skipped, right after the Trainer creates its Accelerator: the same
plugin the Trainer built from `fsdp_config`, distributed type FSDP. Everything after that is accelerate's and torch's
own (fsdp2_prepare_model -> fully_shard, FULL_STATE_DICT saves, resume), and works with gloo: tests/test_distributed.py
trains LoRA on 2 CPU processes and gets the single-process adapter (8.6e-6) with the parameters really sharded.
"""

from __future__ import annotations


def enable_on_cpu(trainer) -> bool:
    """Turn FSDP on for a CPU process group whose Trainer was configured for it (True when it did)."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    if (
        trainer.args.fsdp_plugin_args is None
        or trainer.is_fsdp_enabled
        or state.distributed_type != DistributedType.MULTI_CPU
    ):
        return False
    state.fsdp_plugin = FullyShardedDataParallelPlugin(**trainer.args.fsdp_plugin_args)
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # AcceleratorState and PartialState share it
    trainer.is_fsdp_enabled = True
    return True


def sharded_parameters(model) -> int:
    """Parameters held as DTensor shards (FSDP2's fully_shard), recorded in run.json: proof the run was sharded."""
    from torch.distributed.tensor import DTensor

    return sum(isinstance(p, DTensor) for p in model.parameters())
