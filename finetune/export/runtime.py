"""What every export format gives the gate: the exported model running in its own runtime (llama.cpp, CTranslate2,
ONNX Runtime), asked the same questions as the transformers model it came from."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np


class Runtime(Protocol):
    """An exported model loaded in the runtime users will run it in (never through torch)."""

    engine: str  # the runtime's name as serving.json lists it: "llama.cpp", "CTranslate2", "ONNX Runtime"

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """float32 [len(ids), vocab]: the next-token logits after each prefix of `ids`, from one forward pass."""

    def greedy(self, ids: Sequence[int], n: int) -> list[int]:
        """`n` new tokens after `ids`, each the argmax, decoded incrementally through the runtime's own KV cache;
        EOS does not stop it (the gate compares a fixed number of tokens)."""

    def tokenize(self, text: str) -> list[int] | None:
        """The runtime's own tokenizer where the export carries one (GGUF), special tokens parsed as the training
        tokenizer parses them; None where the runtime takes token ids only."""

    def close(self) -> None:
        """Free the runtime's memory (the gate loads one export at a time)."""
