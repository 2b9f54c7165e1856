"""Where a run's time went: seconds per phase, in run.json's `phase_seconds`.

A user fine-tuning a few hundred rows waits for the whole process, not only the steps (issue 26), so a run records
its own fixed costs: `startup` (from the process's start to the run's: Python, imports, config composition and
validation; the first run of a process only), then each phase of finetune.train.run in order (data, arguments, model,
trainer, before, train, after). What is left of the process's wall time after those is saving the results and
exiting. benchmarks/train.py prints this table for our side of the comparison with the plain TRL recipe.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
_STARTED: list[bool] = []  # a clock was made in this process already


def since_process_start() -> float | None:
    """Seconds since this process started (Linux: /proc), or None where that cannot be read."""
    try:
        fields = Path("/proc/self/stat").read_text().rpartition(")")[2].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22, starttime: ticks after boot
        return max(0.0, float(Path("/proc/uptime").read_text().split()[0]) - started)  # both from boot, 10 ms
    except (OSError, ValueError, IndexError):
        return None


class PhaseClock:
    """Seconds per named phase, in the order they ran."""

    def __init__(self) -> None:
        startup = since_process_start() if not _STARTED else None  # a sweep's second job did not start the process
        _STARTED.append(True)
        self.seconds: dict[str, float] = {} if startup is None else {"startup": round(startup, 2)}

    def timed(self, phase: str, function: Callable[..., T], *args) -> T:
        started = time.perf_counter()
        try:
            return function(*args)
        finally:
            self.seconds[phase] = round(self.seconds.get(phase, 0.0) + time.perf_counter() - started, 2)
