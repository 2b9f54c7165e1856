"""The base model and what wraps it: loading, GPT-Neo's SDPA attention, the fused LM head, the strategy's peft
config, the base's fingerprint, safetensors shards, and the tiny offline models of each family."""
