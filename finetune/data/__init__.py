"""Rows to token ids: sources (files, globs, Hub datasets) -> templates (data_templates/) -> tokenize (masks,
length policy, held-out split) -> packing; preview shows the result without a model."""
