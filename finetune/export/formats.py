"""Which export formats exist, what each architecture can have, and what each needs: a table cheap to import (no
runtime is loaded), read by the export command before any model loads and by serving.json for every run.

llama.cpp has runtimes for GPT-NeoX/Pythia only (no GPT-Neo, no GPT-J graph); CTranslate2 has loaders for GPT-J and
GPT-NeoX, not GPT-Neo; ONNX is the one format that runs GPT-Neo outside PyTorch (local window included), and takes
GPT-J and GPT-NeoX too. Each
format module (finetune.export.<module>) declares the same FAMILIES and its QUANTS; tests/test_export.py checks
that this table agrees with them.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from finetune.errors import ConfigError


@dataclass(frozen=True)
class Format:
    name: str
    module: str  # finetune.export.<module>: write(model_dir, out_dir, quant, chat_template) and load(out_dir)
    engine: str  # the runtime the gate loads it in, as serving.json names it
    families: tuple[str, ...]
    default_quant: str
    runs_with: str  # one line for users: what loads this format
    tolerance: float  # full precision: max abs logit difference per unit of the largest logit (export.gate)


FORMATS = {
    "gguf": Format(
        "gguf",
        "finetune.export.gguf_file",
        "llama.cpp",
        ("gpt_neox",),
        "f32",
        "llama.cpp (llama-cli, llama-server, llama-cpp-python), Ollama (the Modelfile beside it), LM Studio",
        1e-3,  # llama.cpp's CPU GELU rounds its input to f16 and reads a table: 5e-4 (tiny) to 1.8e-3 (160M)
    ),
    "ctranslate2": Format(
        "ctranslate2",
        "finetune.export.ctranslate2_model",
        "CTranslate2",
        ("gptj", "gpt_neox"),
        "float32",
        "ctranslate2.Generator (CPU int8/float32, CUDA float16/int8_float16)",
        1e-4,  # measured ~1e-6
    ),
    "onnx": Format(
        "onnx",
        "finetune.export.onnx_model",
        "ONNX Runtime",
        ("gpt_neo", "gptj", "gpt_neox"),
        "fp32",
        "onnxruntime.InferenceSession with the KV cache inputs (Optimum naming)",
        1e-4,  # measured ~1e-6
    ),
}
FAMILY_NAMES = {"gpt_neo": "GPT-Neo", "gptj": "GPT-J", "gpt_neox": "GPT-NeoX/Pythia"}


def available(family: str) -> list[str]:
    """The formats an architecture can be exported to."""
    return [name for name, fmt in FORMATS.items() if family in fmt.families]


def choose(name: str, family: str) -> Format:
    """The Format for `format=name` on a `family` model; ConfigError (exit 2) naming what works instead."""
    if name not in FORMATS:
        raise ConfigError(f"format={name}: unknown; choose one of {', '.join(FORMATS)}")
    fmt = FORMATS[name]
    if family not in fmt.families:
        works = available(family)
        raise ConfigError(
            f"format={name}: {fmt.engine} has no runtime for {FAMILY_NAMES.get(family, family)} models, so no "
            f"{name} export of one could be checked or run; "
            + (f"use format={' or format='.join(works)}" if works else "no export format supports it")
            + f" (formats by architecture: {by_family()})"
        )
    return fmt


def module(fmt: Format):
    """The format's writer and runtime (imports its engine's package)."""
    return importlib.import_module(fmt.module)


def quants(fmt: Format) -> dict[str, str]:
    return module(fmt).QUANTS


def full_precision(fmt: Format) -> str:
    return module(fmt).FULL


def check_quant(fmt: Format, quant: str | None) -> str:
    """The quant type to write (the format's full precision when not given); ConfigError naming the choices."""
    if quant is None:
        return fmt.default_quant
    types = quants(fmt)
    if quant not in types:
        raise ConfigError(
            f"quant={quant}: not a {fmt.name} type; choose one of " + ", ".join(f"{k} ({v})" for k, v in types.items())
        )
    return quant


def by_family() -> str:
    """Which formats each architecture has, in one line (for messages)."""
    return "; ".join(f"{label}: {', '.join(available(f)) or 'none'}" for f, label in FAMILY_NAMES.items())
