"""Base vs fine-tuned: held-out loss and generation metrics, lm-evaluation-harness tasks, and the report."""
