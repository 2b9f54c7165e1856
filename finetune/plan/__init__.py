"""The planner: memory and time of a preset on a GPU from the model's architecture alone (no weights).

cli (`finetune plan`, `python -m finetune.plan`) -> planning (Plan, plan_preset, plan) over checks (validation, notes),
architecture (config.json -> Architecture, Adapter), hardware (the GPU table), setup (the settings that matter),
memory and activations (the memory model), throughput (FLOPs, time), suggestions (the fixes of fixes.py, re-planned)
and render (the report). fixes.py is also the list finetune.train.oom prints after a run ran out of memory.
"""
