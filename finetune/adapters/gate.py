"""The merge's numerical gate: do the merged weights compute what base + adapter computed?

Two ways, chosen by `gate=` (auto picks full up to FULL_GATE_MAX_BYTES of base weights, layers above):
- full: fixed probe prompts through base + adapter (unmerged, fp32: peft's own LoRA/DoRA layer on each adapted
  module) and through the merged model as written to disk (in the merged dtype); the measure is the max abs logit
  difference. Both models run streamed (`streamed`): transformers' disk offload over the safetensors files as they
  are, one module's weights in memory at a time, so the gate's peak stays within the streaming merge's bound (one
  tensor plus the adapter) instead of holding a whole model, let alone two (tests/test_gate_memory.py).
- layers: for models too big to load twice, a sample of adapted layers (first, middle and last block): a fixed
  random input through peft's own unmerged LoRA/DoRA layer (fp32) and through the merged weight read back from the
  output shard; the measure is the max abs output difference relative to the output's scale.

Tolerance: fp32 1e-4. A bf16/fp16 merge cannot match fp32 closer than rounding allows, so its tolerance is
GAP_FACTOR times the base's own low-precision gap (the same measure for the base alone, fp32 vs the merged dtype).
A wrong merge (a missing delta, a wrong scale, a tampered adapter or shard) moves the output by far more.

QLoRA adapters trained on a 4-bit NF4 copy of the base, but merge into the base's real (bf16/fp32) weights: the merged
model cannot equal the 4-bit model in logits. So the full gate also compares the merged model with the model that
trained (4-bit base + adapter, loaded with the recorded quantization) in next-token probabilities, with tolerance
GAP_FACTOR times the base's own gap in the same measure (4-bit base vs unquantized base). That needs bitsandbytes
that runs here (CUDA, or >= 0.50 on CPU); otherwise the report says why it was not measured.
"""

from __future__ import annotations

import gc
import re
from pathlib import Path

from finetune.adapters.adapter_files import module_of
from finetune.models import shards

FP32_TOLERANCE = 1e-4
GAP_FACTOR = 2.0
FULL_GATE_MAX_BYTES = 8 * 2**30  # streamed, the full gate reads every weight three times: above this, sample layers
LAYER_SAMPLE_MAX = 16
PROBES = (
    "The tenant shall keep the premises in good repair.",
    "What are the common symptoms of iron deficiency?",
    "Summarise the indemnification clause in plain English:",
    "def fibonacci(n):\n    ",
)
PROBE_TOKENS = 48


def check(
    base_dir: Path,
    adapter,
    merged_dir: Path,
    dtype: str,
    mode: str = "auto",
    tolerance: float | None = None,
    allow_pickle: bool = False,
    quantization: dict | None = None,
) -> dict:
    """{"mode", "max_abs_diff", "reference_gap", "tolerance", "passed", ...} for an adapter_files.Adapter (as the merge
    read it)
    merged into `merged_dir`; allow_pickle as the merge was given it; `quantization`: the QLoRA base's
    BitsAndBytesConfig kwargs (base_model.json), which adds "trained_model" (passed is then both checks)."""
    if mode == "auto":
        mode = "full" if weight_bytes(base_dir, allow_pickle) <= FULL_GATE_MAX_BYTES else "layers"
    if mode == "full":
        result = _full(base_dir, adapter, merged_dir, dtype, allow_pickle)
    else:
        result = _layers(base_dir, adapter, merged_dir, dtype, allow_pickle)
    if tolerance is None:
        tolerance = FP32_TOLERANCE if dtype == "float32" else max(FP32_TOLERANCE, GAP_FACTOR * result["reference_gap"])
    result.update(mode=mode, tolerance=tolerance, passed=bool(result["max_abs_diff"] <= tolerance))
    if quantization:
        if mode == "full":
            result["trained_model"] = _against_4bit(base_dir, adapter.folder, merged_dir, dtype, quantization)
        else:
            result["trained_model"] = {
                "measured": False,
                "why": "gate=layers compares sampled layers; gate=full compares "
                "the merged model with the 4-bit model that trained",
            }
        result["merge_passed"] = result["passed"]
        result["passed"] = result["passed"] and result["trained_model"].get("passed", True)
    return result


def _against_4bit(base_dir: Path, adapter_dir: Path, merged_dir: Path, dtype: str, quantization: dict) -> dict:
    """Next-token probabilities of the merged model vs the 4-bit base + adapter (the model QLoRA trained), and the
    base's
    own 4-bit gap in the same measure, which sets the tolerance."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from finetune.models.strategy import bitsandbytes_problem

    cuda = torch.cuda.is_available()
    problem = bitsandbytes_problem(cuda)
    if problem:
        return {"measured": False, "why": problem}
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    probes = [tokenizer(p, return_tensors="pt").input_ids[:, :PROBE_TOKENS] for p in PROBES]
    compute = getattr(torch, quantization.get("bnb_4bit_compute_dtype", "bfloat16"))
    device = "cuda:0" if cuda else "cpu"
    four_bit = AutoModelForCausalLM.from_pretrained(
        base_dir,
        quantization_config=BitsAndBytesConfig(**{**quantization, "bnb_4bit_compute_dtype": compute}),
        dtype=compute,
        device_map={"": device},
        use_safetensors=True,
    )
    trained = PeftModel.from_pretrained(four_bit, adapter_dir).eval()
    reference = _probabilities(trained, probes, device)
    with trained.disable_adapter():
        base_4bit = _probabilities(trained, probes, device)
    del trained, four_bit
    gc.collect()
    base = (
        AutoModelForCausalLM.from_pretrained(base_dir, dtype=getattr(torch, dtype), use_safetensors=True)
        .to(device)
        .eval()
    )
    gap = _max_diff(_probabilities(base, probes, device), base_4bit)
    del base
    gc.collect()
    merged = (
        AutoModelForCausalLM.from_pretrained(merged_dir, dtype=getattr(torch, dtype), use_safetensors=True)
        .to(device)
        .eval()
    )
    got = _probabilities(merged, probes, device)
    diff = _max_diff(got, reference)
    top1 = sum(int((g.argmax(-1) == r.argmax(-1)).sum()) for g, r in zip(got, reference)) / sum(
        r.shape[1] for r in reference
    )
    tolerance = GAP_FACTOR * gap if gap > 0 else FP32_TOLERANCE
    return {
        "measured": True,
        "measure": "next-token probabilities vs 4-bit base + adapter",
        "max_abs_diff": diff,
        "reference_gap": gap,
        "tolerance": tolerance,
        "passed": bool(diff <= tolerance),
        "top1_agreement": round(top1, 4),
        "quantization": quantization,
    }


def _probabilities(model, probes, device: str) -> list:
    import torch

    with torch.no_grad():
        return [model(input_ids=ids.to(device)).logits.float().softmax(-1).cpu() for ids in probes]


def _full(base_dir: Path, adapter, merged_dir: Path, dtype: str, allow_pickle: bool) -> dict:
    import tempfile

    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    probes = [tokenizer(p, return_tensors="pt").input_ids[:, :PROBE_TOKENS] for p in PROBES]
    with tempfile.TemporaryDirectory(prefix="finetune-gate-") as offload:  # stays empty for safetensors weights
        base = streamed(base_dir, torch.float32, offload, allow_pickle)
        finder = _TensorFinder(base_dir, allow_pickle)
        try:
            modules = dict(base.named_modules())
            hooks = [
                modules[name].register_forward_hook(_unmerged(finder, name, lora, adapter))
                for name, lora in adapter.modules.items()
            ]
            reference = _logits(base, probes)
            for hook in hooks:
                hook.remove()
            gap = 0.0
            if dtype != "float32":  # the base's own gap: fp32 vs the merged dtype
                base_fp32 = _logits(base, probes)
                del base
                gap = _max_diff(
                    _logits(streamed(base_dir, getattr(torch, dtype), offload, allow_pickle), probes), base_fp32
                )
        finally:
            finder.close()
        merged = streamed(merged_dir, getattr(torch, dtype), offload, False)
        diff = _max_diff(_logits(merged, probes), reference)
    return {"max_abs_diff": diff, "reference_gap": gap, "measure": "logits", "probes": len(probes)}


def streamed(folder: Path, dtype, offload: str, allow_pickle: bool = False):
    """The model in `folder` for inference with every module offloaded to disk: transformers' own disk offload, which
    reads safetensors weights in place (nothing is copied to `offload`) and loads each module's weights only while it
    runs, so memory holds one module's weights (in `dtype`) at a time, never the model. A pickled base (allow_pickle)
    is loaded whole: torch.load reads a whole file, and the offload would copy it."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    if any(path.suffix != ".safetensors" for path in shards.weight_files(folder, allow_pickle)):
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, use_safetensors=None).eval()
    config = AutoConfig.from_pretrained(folder)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    device_map = {
        name: "disk"
        for name, module in skeleton.named_modules()
        if name and any(True for _ in module.parameters(recurse=False))
    }
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, device_map=device_map, offload_folder=offload, use_safetensors=True
    )
    del skeleton
    return model.eval()


def _unmerged(finder, name: str, lora, adapter):
    """A forward hook that adds an adapted module's unmerged LoRA/DoRA contribution (peft's own layer around the base
    weight, read from its shard for this call) to the module's output."""
    import torch.nn.functional as F

    weight_name = finder.name_for(name)

    def hook(module, args, output):
        weight = finder.read(weight_name).float()
        x = args[0].float()
        delta = _peft_layer(weight, lora, adapter)(x) - F.linear(x, weight.T if adapter.fan_in_fan_out else weight)
        if lora.bias is not None:
            delta = delta + lora.scale * lora.bias.float()  # peft scales B's bias with B: (B·A·x + b) * scale
        return output + delta.to(output.dtype)

    return hook


def _logits(model, probes) -> list:
    """Each probe's logits, from one right-padded batch: one pass over a streamed model's weights, not one per probe
    (padding after a causal sequence cannot change its logits)."""
    import torch

    longest = max(ids.shape[1] for ids in probes)
    batch = torch.zeros(len(probes), longest, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for row, ids in enumerate(probes):
        batch[row, : ids.shape[1]], mask[row, : ids.shape[1]] = ids[0], 1
    with torch.no_grad():
        logits = model(input_ids=batch, attention_mask=mask).logits.float()
    return [logits[row : row + 1, : ids.shape[1]] for row, ids in enumerate(probes)]


def _max_diff(a: list, b: list) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def _layers(base_dir: Path, adapter, merged_dir: Path, dtype: str, allow_pickle: bool) -> dict:
    import torch

    sample = _sample(list(adapter.modules))
    base, merged = _TensorFinder(base_dir, allow_pickle), _TensorFinder(merged_dir)
    generator = torch.Generator().manual_seed(0)
    worst, gap = 0.0, 0.0
    try:
        for name in sample:
            lora = adapter.modules[name]
            weight_name = base.name_for(name)
            w_base, w_merged = base.read(weight_name).float(), merged.read(weight_name).float()
            x = torch.randn(8, lora.A.shape[1], generator=generator)
            reference = _peft_layer(w_base, lora, adapter)(x)
            scale = float(reference.abs().max()) or 1.0
            got = x @ (w_merged if adapter.fan_in_fan_out else w_merged.T)
            worst = max(worst, float((got - reference).abs().max()) / scale)
            if dtype != "float32":  # the base layer computed in the merged dtype vs in fp32
                w, low = (w_base if adapter.fan_in_fan_out else w_base.T), getattr(torch, dtype)
                gap = max(gap, float(((x.to(low) @ w.to(low)).float() - x @ w).abs().max()) / scale)
    finally:
        base.close()
        merged.close()
    return {"max_abs_diff": worst, "reference_gap": gap, "measure": "layer outputs / their max", "layers": sample}


def _peft_layer(weight, lora, adapter):
    """peft's own unmerged LoRA/DoRA Linear around the base weight, loaded with the adapter's tensors."""
    import math

    import torch
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as LoraLinear

    out_features, in_features = weight.T.shape if adapter.fan_in_fan_out else weight.shape
    base_layer = torch.nn.Linear(in_features, out_features, bias=False, device="meta")  # no random init to throw away
    base_layer.weight = torch.nn.Parameter(weight, requires_grad=False)
    r = lora.A.shape[0]
    rslora = bool(adapter.config.get("use_rslora"))
    alpha = lora.scale * (math.sqrt(r) if rslora else r)
    config = LoraConfig.from_pretrained(str(adapter.folder))
    config.lora_dropout = 0.0
    layer = LoraLinear(base_layer, "default", config, r=r, lora_alpha=alpha)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(lora.A.float())
        layer.lora_B["default"].weight.copy_(lora.B.float())
        if adapter.dora:
            layer.lora_magnitude_vector["default"].weight.copy_(lora.magnitude.float())
    layer.eval()

    def forward(x):
        with torch.no_grad():
            return layer(x)

    return forward


def _sample(modules: list[str]) -> list[str]:
    """Every adapted module of the first, middle and last block (capped)."""

    def block(name: str) -> int:
        numbers = re.findall(r"\.(\d+)\.", name)
        return int(numbers[0]) if numbers else -1

    blocks = sorted({block(m) for m in modules})
    chosen = {blocks[0], blocks[len(blocks) // 2], blocks[-1]}
    return [m for m in sorted(modules, key=block) if block(m) in chosen][:LAYER_SAMPLE_MAX]


class _TensorFinder:
    """Read named tensors from a model folder's weight files, opening each file once."""

    def __init__(self, folder: Path, allow_pickle: bool = False):
        self.readers = [shards.open_weights(p) for p in shards.weight_files(folder, allow_pickle)]

    def name_for(self, module: str) -> str:
        """The checkpoint's name for an adapted module's weight (adapter_files.module_of's matching)."""
        return next(
            name
            for reader in self.readers
            for name in reader.tensors
            if name.endswith(".weight") and module_of(name, {module: None})
        )

    def read(self, name: str):
        return next(r for r in self.readers if name in r.tensors).read(name)

    def close(self) -> None:
        for reader in self.readers:
            reader.close()


def weight_bytes(folder: Path, allow_pickle: bool) -> int:
    return sum(path.stat().st_size for path in shards.weight_files(folder, allow_pickle))
