"""Which inference engines load an export as is, per architecture: written as serving.json and into the model card.

Checked in November 2026 against vLLM 0.33 (model registry, LoRA and DoRA checks), TGI's supported-models list and
server code, llama.cpp's converters (commit 0c1e57098bba) and transformers 5.23 / peft 0.21 (loaded on tiny
models). Update the tables with the engines. What users need most: vLLM and TGI cannot serve a LoRA adapter for
these architectures, and nothing but PEFT loads a DoRA adapter correctly, so such exports are served merged
(python -m finetune.merge). `finetune serve` (this toolkit's OpenAI-compatible server) serves LoRA and QLoRA adapters
of all three families as they are, several over one base, and any merged or fully fine-tuned model.
"""

from __future__ import annotations

ENGINES = ("transformers", "PEFT", "vLLM", "TGI", "llama.cpp", "finetune serve")
SERVE = "finetune serve"  # this toolkit's own server (finetune.inference.serve): an OpenAI-compatible API
FAMILIES = ("gpt_neo", "gptj", "gpt_neox")

# (engine, family) -> (loads, note) for full weights (a merged model or a full fine-tune)
MERGED = {
    **{("transformers", f): ("yes", "AutoModelForCausalLM.from_pretrained") for f in FAMILIES},
    **{("PEFT", f): ("n/a", "full weights, no adapter") for f in FAMILIES},
    ("vLLM", "gpt_neo"): ("no", "GPTNeoForCausalLM is not supported, natively or through vLLM's transformers backend"),
    ("vLLM", "gptj"): ("yes", "native GPTJForCausalLM"),
    ("vLLM", "gpt_neox"): ("yes", "GPTNeoXForCausalLM (GPT-NeoX, Pythia)"),
    ("TGI", "gpt_neo"): ("caveat", "transformers fallback, no optimized kernels; TGI is in maintenance mode"),
    ("TGI", "gptj"): ("yes", "optimized model; TGI is in maintenance mode"),
    ("TGI", "gpt_neox"): ("yes", "optimized model; TGI is in maintenance mode"),
    ("llama.cpp", "gpt_neo"): ("no", "no converter and no runtime for GPT-Neo"),
    ("llama.cpp", "gptj"): ("no", "no converter and no runtime for GPT-J"),
    ("llama.cpp", "gpt_neox"): (
        "caveat",
        "convert_hf_to_gguf.py converts it, run in llama.cpp's own environment "
        "(it pins transformers 4.x; with 5.x it fails on rotary_pct)",
    ),
    **{(SERVE, f): ("yes", "finetune serve MODEL_DIR: OpenAI-compatible API, batched requests") for f in FAMILIES},
}

# (engine, family) -> (loads, note) for a LoRA adapter in PEFT layout (DoRA: see report())
ADAPTER = {
    **{
        ("transformers", f): ("yes", "with peft installed, AutoModelForCausalLM.from_pretrained(adapter folder)")
        for f in FAMILIES
    },
    **{("PEFT", f): ("yes", "PeftModel.from_pretrained(base, adapter folder)") for f in FAMILIES},
    ("vLLM", "gpt_neo"): ("no", "GPT-Neo is not supported by vLLM at all: merge, then serve elsewhere"),
    ("vLLM", "gptj"): ("no", "no LoRA support for GPTJForCausalLM: merge first"),
    ("vLLM", "gpt_neox"): ("no", "no LoRA support listed for GPTNeoXForCausalLM: merge first"),
    **{("TGI", f): ("no", "multi-LoRA serving does not cover this architecture: merge first") for f in FAMILIES},
    ("llama.cpp", "gpt_neo"): ("no", "convert_lora_to_gguf.py: GPTNeoForCausalLM is not supported"),
    ("llama.cpp", "gptj"): ("no", "convert_lora_to_gguf.py: GPTJForCausalLM is not supported"),
    ("llama.cpp", "gpt_neox"): (
        "caveat",
        "convert_lora_to_gguf.py --base BASE, over a GGUF of the base; merging is simpler",
    ),
    **{
        (SERVE, f): (
            "yes",
            "finetune serve RUN_DIR [RUN_DIR ...]: OpenAI-compatible API; adapters over one base share it, requests "
            "for different adapters batched together",
        )
        for f in FAMILIES
    },
}
DORA = {  # a DoRA adapter where the LoRA table says yes/caveat
    "transformers": "transformers 5.23 misreads DoRA magnitudes and silently loads a different model: use PEFT, or "
    "merge",
    "llama.cpp": "convert_lora_to_gguf.py rejects lora_magnitude_vector (no DoRA): merge first",
    "vLLM": "vLLM does not support DoRA: merge first",
    SERVE: "peft cannot batch DoRA adapters with others (finetune serve refuses them): merge, then finetune serve "
    "RUN_DIR/merged",
}
SOURCES = {
    "vLLM": "https://docs.vllm.ai/en/latest/models/supported_models.html",
    "TGI": "https://huggingface.co/docs/text-generation-inference/supported_models",
    "llama.cpp": "https://github.com/ggml-org/llama.cpp (conversion/gptneox.py, convert_lora_to_gguf.py)",
}


def report(family: str, kind: str, dora: bool = False) -> list[dict]:
    """One row per engine for an export of `kind` ("adapter", "merged" or "model") of a `family` model."""
    table = ADAPTER if kind == "adapter" else MERGED
    rows = []
    for engine in ENGINES:
        loads, note = table.get((engine, family), ("unknown", "not checked for this architecture"))
        if kind == "adapter" and dora and engine in DORA:
            loads, note = "no", DORA[engine]
        rows.append({"engine": engine, "loads": loads, "note": note, "source": SOURCES.get(engine, "")})
    return rows
