"""The planner: memory and time of a preset on a GPU from the model's architecture alone (no weights)."""
