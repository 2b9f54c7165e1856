"""accelerate imports DeepSpeed, when it is installed, just to ask whether a model is a `DeepSpeedEngine`
(`accelerate.utils.other.extract_model_from_parallel`, which every Trainer construction and save calls): 1.2 s of a
2-core CPU run that never uses DeepSpeed, one of the largest fixed costs of a small run (benchmarks/RESULTS.md).

An engine can only exist in a process that has imported `deepspeed` (accelerate and transformers import it when a
DeepSpeed config is given, long before any model is wrapped), so until then the answer is "no" without the import.
`answer_without_importing()` makes accelerate's check say exactly that; once deepspeed is imported, its own check runs
unchanged. tests/test_deepspeed_probe.py shows the import gone, and engines still recognised after a real import.
"""

from __future__ import annotations

import sys


def answer_without_importing() -> None:
    """Patch `accelerate.utils.other.is_deepspeed_available` (the name extract_model_from_parallel reads) to be false
    while no `deepspeed` module is loaded. Idempotent."""
    import accelerate.utils.other as accelerate_other

    installed = accelerate_other.is_deepspeed_available
    if getattr(installed, "_finetune_probe", False):
        return

    def is_deepspeed_available() -> bool:
        return "deepspeed" in sys.modules and installed()

    is_deepspeed_available._finetune_probe = True
    accelerate_other.is_deepspeed_available = is_deepspeed_available
