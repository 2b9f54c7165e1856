# finetune: parameter-efficient fine-tuning for the GPT-Neo family
"""neo-finetune: LoRA / DoRA / QLoRA / full SFT for GPT-Neo, GPT-J, Pythia and GPT-NeoX."""

import logging

__version__ = "0.1.0"

# Library notices that say nothing to the person running the job, dropped by a filter on their logger. Installed here,
# when `finetune` is first imported, because some are logged while the library itself is imported (bitsandbytes, by
# peft), before any of our code runs; only these messages are dropped, every other record of those loggers stays.
LIBRARY_NOTICES = {
    # DeepSpeed, imported by accelerate's model checks wherever it is installed, finds no GPU: the CPU is what it uses.
    "DeepSpeed": "Setting accelerator to CPU",
    # transformers hands accelerate 1 on purpose under DeepSpeed (it accumulates itself); ours is the value used.
    "accelerate.accelerator": "Gradient accumulation steps mismatch: GradientAccumulationPlugin has 1,",
    # bitsandbytes >= 0.50 on a CPU with AVX512-BF16 tries to fetch an optional 4-bit GEMM kernel from the Hub at
    # import and, when it cannot, uses its own built-in CPU kernel.
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community",
    # transformers >= 5.24 probes the Hub's flash-attention kernels (for any model that declares flash attention) and
    # bitsandbytes its GEMM kernel through the `kernels` package, which notes each skipped trust check when offline.
    "kernels._internals.hf_hub": "Skipping publisher trust check for 'kernels-community/",
}


class _DropNotice(logging.Filter):
    """Drops the records containing one message."""

    def __init__(self, notice: str):
        super().__init__()
        self.notice = notice

    def filter(self, record) -> bool:
        return self.notice not in record.getMessage()


for _name, _notice in LIBRARY_NOTICES.items():
    logging.getLogger(_name).addFilter(_DropNotice(_notice))
