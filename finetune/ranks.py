"""Which process of a distributed launch this is, read from the launcher's environment.

torchrun / `accelerate launch` set RANK and WORLD_SIZE (MPI launchers their PMI_* / OMPI_* equivalents, the same list
accelerate reads). These are readable before torch.distributed exists: the run directory is prepared (config checks,
run.json, the checkpoint to resume) before the trainer does, and every rank shares the one `output_dir`, so only
rank 0 writes there. Cheap to import: no torch.
"""

from __future__ import annotations

import os

_RANK = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")
_WORLD = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def _first_int(names: tuple[str, ...], default: int) -> int:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            return int(value)
    return default


def rank() -> int:
    """Global rank of this process (0 without a launcher)."""
    return _first_int(_RANK, 0)


def world_size() -> int:
    """Number of processes in the launch (1 without a launcher)."""
    return _first_int(_WORLD, 1)


def is_main() -> bool:
    """True on the one process that writes run files (rank 0)."""
    return rank() == 0
