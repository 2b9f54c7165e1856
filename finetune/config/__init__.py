"""The config: its schema (our keys, each documented), composition of presets and overrides, validation before
anything loads, precision, and the secrets that must never reach a file."""
