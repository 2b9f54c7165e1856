"""`finetune plan`: placeholder re-export while planner.py is split."""

from finetune.plan.planner import main  # noqa: F401
