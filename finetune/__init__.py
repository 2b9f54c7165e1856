# finetune: parameter-efficient fine-tuning for the GPT-Neo family
"""neo-finetune: LoRA / DoRA / QLoRA / full SFT for GPT-Neo, GPT-J, Pythia and GPT-NeoX."""

__version__ = "0.1.0"
