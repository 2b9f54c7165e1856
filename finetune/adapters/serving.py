"""Which inference engines load an export as is, per architecture: written as serving.json and into the model card.

Checked in November 2026 against vLLM 0.33 (model registry, LoRA and DoRA checks), TGI's supported-models list and
server code, llama.cpp's converters (commit 0c1e57098bba) and transformers 5.23 / peft 0.21 (loaded on tiny
models). Update the tables with the engines. What users need most: vLLM and TGI cannot serve a LoRA adapter for
these architectures, and nothing but PEFT loads a DoRA adapter correctly, so such exports are served merged
(python -m finetune.merge). `finetune serve` (this toolkit's OpenAI-compatible server) serves LoRA and QLoRA adapters
of all three families as they are, several over one base, and any merged or fully fine-tuned model.

The rows of the engines `finetune export` writes for (llama.cpp, CTranslate2, ONNX Runtime) are not kept by hand:
which architecture each can load comes from finetune.export.formats, and once a run has exports
(RUN/exports/*/export.json) their rows say what the export gate measured.
"""

from __future__ import annotations

import json
from pathlib import Path

ENGINES = ("transformers", "PEFT", "vLLM", "TGI", "llama.cpp", "CTranslate2", "ONNX Runtime", "finetune serve")
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
    "vLLM": "vLLM does not support DoRA: merge first",
    SERVE: "peft cannot batch DoRA adapters with others (finetune serve refuses them): merge, then finetune serve "
    "RUN_DIR/merged",
}
SOURCES = {
    "vLLM": "https://docs.vllm.ai/en/latest/models/supported_models.html",
    "TGI": "https://huggingface.co/docs/text-generation-inference/supported_models",
    "llama.cpp": "https://github.com/ggml-org/llama.cpp",
    "CTranslate2": "https://opennmt.net/CTranslate2/guides/transformers.html",
    "ONNX Runtime": "https://onnxruntime.ai",
}


def report(family: str, kind: str, dora: bool = False, exports: list[dict] | None = None) -> list[dict]:
    """One row per engine for an export of `kind` ("adapter", "merged", "model" or "export") of a `family` model;
    `exports`: the run's export.json records, whose gate results become their engines' rows."""
    table = ADAPTER if kind == "adapter" else MERGED
    rows = []
    for engine in ENGINES:
        loads, note = table.get((engine, family)) or _export_row(engine, family, kind)
        if kind == "adapter" and dora and engine in DORA:
            loads, note = "no", DORA[engine]
        measured = [e for e in exports or [] if e.get("engine") == engine]
        row = {"engine": engine, "loads": loads, "note": note, "source": SOURCES.get(engine, "")}
        if measured:
            row.update(_measured(measured))
        rows.append(row)
    return rows


def _export_row(engine: str, family: str, kind: str) -> tuple[str, str]:
    """What an engine of `finetune export` loads, from the export formats' table (nothing measured yet)."""
    from finetune.export import formats

    fmt = next((f for f in formats.FORMATS.values() if f.engine == engine), None)
    if fmt is None:
        return "unknown", "not checked for this architecture"
    if family not in fmt.families:
        return "no", f"no {engine} runtime for {formats.FAMILY_NAMES.get(family, family)} models"
    merged = " (the adapter merged on the fly)" if kind == "adapter" else ""
    return "export", f"finetune export RUN format={fmt.name}{merged}: written and checked against transformers"


def _measured(records: list[dict]) -> dict:
    """The row for an engine with exports: yes when one passed its gate, with what each gate measured."""
    from finetune.export import gate

    notes = [
        f"{r['format']} {r['quant']} ({'passed' if r.get('valid') else 'FAILED'}): {gate.summary(r['gate'])}"
        for r in records
    ]
    return {
        "loads": "yes" if any(r.get("valid") for r in records) else "no",
        "note": "; ".join(notes),
        "measured": True,
    }


def exports_of(run_dir: Path | None) -> list[dict]:
    """The export.json records of a run's finished exports (RUN/exports/NAME/export.json)."""
    if run_dir is None:
        return []
    records = []
    for path in sorted((run_dir / "exports").glob("*/export.json")):
        if path.parent.suffix in (".invalid", ".partial"):
            continue  # a failed gate's folder, set aside; or one being written
        try:
            records.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            continue  # a record being written or damaged: no claim is made from it
    return records
