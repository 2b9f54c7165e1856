"""One training run: the command (Hydra), the run's phases (run.py), the guarded SFT trainer, checkpoints,
preemption and non-finite guards, out-of-memory advice, progress, tracking, sweeps."""
