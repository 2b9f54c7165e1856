"""The export gate: the exported model, loaded in its own runtime, must answer as the transformers model it came
from, on the run's held-out prompts rendered with its training template.

- Tokenizer: where the export carries its own (GGUF), it must encode every prompt to the same ids as the training
  tokenizer, special tokens included (a GGUF whose tokenizer differs answers a different prompt).
- Full precision (f32 / float32 / fp32): the max abs logit difference over every prompt position within
  `tolerance` (default: the format's relative tolerance times the largest reference logit, at least 10 units of
  it: kernels sum in different orders, and llama.cpp's CPU GELU reads an f16 table, ~1e-3 of the logits), and
  greedy decoding through the runtime's own KV cache identical to transformers' for `tokens` tokens. A divergence
  where transformers' own top two logits are closer than the tolerance is a tie, reported, not a failure.
- Quantized types: top-1 agreement and the mean log-probability gap of the reference's top token, against QUANTIZED
  thresholds by bit width. Agreement counts the positions where transformers' own top two logits are further apart
  than the bit width's tie margin: a flip between two near-equal tokens is rounding, not a broken export (random or
  barely trained weights have many; the agreement over all positions is reported beside it).
A GPT-Neo model gets one prompt longer than its local window, so an export that treats local layers as global fails.
The reference is transformers' eager attention in float32 (the exact path), whole when it fits in
IN_MEMORY_MAX_BYTES, else streamed from disk one module at a time (adapters.gate.streamed) with fewer greedy
tokens (each token is one pass over the weights).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

FP32_TOLERANCE = 1e-4  # per unit of the largest reference logit (never below 10 units), unless the format says
QUANTIZED = {  # bit width -> (min top-1 agreement, max mean log-prob gap in nats, tie margin in logits)
    16: (0.97, 0.02, 0.01),
    8: (0.90, 0.10, 0.05),
    4: (0.80, 0.30, 0.20),
}
TOKENS = 32  # greedy tokens compared per prompt
STREAMED_TOKENS = 4
IN_MEMORY_MAX_BYTES = 8 * 2**30  # fp32 reference weights held whole below this
PROMPTS_MAX = 4


def bits(quant: str) -> int | None:
    """None for full precision; else the weights' bit width (f16/bf16/float16: 16, q8_0/int8*: 8, q4*: 4)."""
    name = quant.lower()
    if name in ("f32", "float32", "fp32"):
        return None
    if name.startswith(("f16", "bf16", "float16", "bfloat16", "fp16")):
        return 16
    if "8" in name:
        return 8
    return 4


def check(
    model_dir: Path,
    runtime,
    prompts: list[str],
    quant: str,
    tokens: int | None = None,
    tolerance: float | None = None,
    min_top1: float | None = None,
    max_gap: float | None = None,
    relative: float = FP32_TOLERANCE,
) -> dict:
    """The gate's measurements and verdict (JSON-ready) for `runtime` (a finetune.export.runtime.Runtime)."""
    reference = Reference(model_dir)
    tokens = tokens or (TOKENS if not reference.streamed else STREAMED_TOKENS)
    width = bits(quant)
    result = {
        "engine": runtime.engine,
        "quant": quant,
        "precision": "full" if width is None else f"{width}-bit",
        "reference": f"transformers eager float32{' (streamed)' if reference.streamed else ''}",
        "tokens": tokens,
        "prompts": [],
    }
    reasons, diffs, agree, counted, gaps, same, positions = [], [], 0, 0, [], 0, 0
    tie_margin = None if width is None else QUANTIZED[width][2]
    for text in reference.long_prompts(prompts, tokens):
        ids = reference.encode(text, tokens)
        row = {"prompt_tokens": len(ids)}
        own = runtime.tokenize(text)
        if own is not None:
            row["tokenizer_equal"] = list(own) == ids
            if not row["tokenizer_equal"]:
                at = next((i for i, (a, b) in enumerate(zip(own, ids)) if a != b), min(len(own), len(ids)))
                reasons.append(f"{runtime.engine}'s tokenizer encodes a prompt differently from position {at}")
        ref_logits, ref_tokens, margins = reference.run(ids, tokens)
        got = np.asarray(runtime.logits(ids), dtype=np.float32)
        if got.shape != ref_logits.shape:
            reasons.append(f"logits shape {got.shape}, transformers {ref_logits.shape}")
            result["prompts"].append(row)
            continue
        scale = max(10.0, float(np.abs(ref_logits).max()))
        limit = tolerance if tolerance is not None else relative * scale
        diffs.append(float(np.abs(got - ref_logits).max()))
        top2 = np.sort(ref_logits, axis=-1)[:, -2:]
        clear = (top2[:, 1] - top2[:, 0]) > (limit if tie_margin is None else tie_margin)
        matches = got.argmax(-1) == ref_logits.argmax(-1)
        agree, counted = agree + int((matches & clear).sum()), counted + int(clear.sum())
        same, positions = same + int(matches.sum()), positions + len(ids)
        best = ref_logits.argmax(-1)
        picked = np.arange(len(ids))
        gaps.append(float(np.abs(_log_softmax(ref_logits)[picked, best] - _log_softmax(got)[picked, best]).mean()))
        greedy = list(runtime.greedy(ids, tokens))
        matched = next((i for i, (a, b) in enumerate(zip(greedy, ref_tokens)) if a != b), min(len(greedy), tokens))
        row.update(max_abs_diff=diffs[-1], greedy_matched=matched, tolerance=limit)
        if matched < tokens:
            row["tie"] = matched < len(margins) and margins[matched] <= limit
            if width is None and not row["tie"]:
                reasons.append(
                    f"greedy tokens differ from transformers' at new token {matched + 1} of {tokens} "
                    f"(transformers' top-two margin there {margins[matched]:.2e})"
                    if matched < len(margins)
                    else f"{runtime.engine} produced {len(greedy)} tokens, not {tokens}"
                )
        result["prompts"].append(row)
    reference.close()
    result["max_abs_diff"] = max(diffs) if diffs else None
    result["top1_agreement"] = agree / counted if counted else 1.0
    result["top1_agreement_all_positions"] = same / positions if positions else None
    result["tie_margin"] = tie_margin
    result["mean_logprob_gap"] = float(np.mean(gaps)) if gaps else None
    result["greedy_identical"] = sum(r.get("greedy_matched") == tokens for r in result["prompts"])
    if width is None:
        limit = max(r.get("tolerance", 0.0) for r in result["prompts"]) if result["prompts"] else tolerance
        result["tolerance"] = limit
        if diffs and max(diffs) > limit:
            reasons.append(f"max abs logit difference {max(diffs):.2e} exceeds the tolerance {limit:.2e}")
    else:
        floor, ceiling, _ = QUANTIZED[width]
        floor = min_top1 if min_top1 is not None else floor
        ceiling = max_gap if max_gap is not None else ceiling
        result["thresholds"] = {"min_top1_agreement": floor, "max_mean_logprob_gap": ceiling}
        if result["top1_agreement"] < floor:
            reasons.append(f"top-1 agreement {result['top1_agreement']:.1%} is below {floor:.0%}")
        if result["mean_logprob_gap"] is not None and result["mean_logprob_gap"] > ceiling:
            reasons.append(f"mean log-probability gap {result['mean_logprob_gap']:.3f} exceeds {ceiling}")
    result["passed"] = not reasons and bool(diffs)
    result["reasons"] = reasons or ([] if diffs else ["no prompt was compared"])
    return result


def summary(result: dict) -> str:
    """One line for the terminal and the card."""
    if result["precision"] == "full":
        line = (
            f"max abs logit difference {result['max_abs_diff']:.2e} (tolerance {result['tolerance']:.2e}), "
            f"greedy {result['tokens']} tokens identical on {result['greedy_identical']}/{len(result['prompts'])} "
            "prompts"
        )
    else:
        t = result["thresholds"]
        line = (
            f"top-1 agreement {result['top1_agreement']:.1%} (min {t['min_top1_agreement']:.0%}), mean log-prob gap "
            f"{result['mean_logprob_gap']:.3f} (max {t['max_mean_logprob_gap']})"
        )
    return f"{result['engine']} vs transformers: {line}"


class Reference:
    """The transformers model the export came from, in float32 with eager attention, and its tokenizer."""

    def __init__(self, model_dir: Path):
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        from finetune.adapters import gate as merge_gate

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.config = AutoConfig.from_pretrained(model_dir)
        self.streamed = _fp32_bytes(model_dir) > IN_MEMORY_MAX_BYTES
        self._offload = None
        if self.streamed:
            import tempfile

            self._offload = tempfile.TemporaryDirectory(prefix="finetune-export-gate-")
            self.model = merge_gate.streamed(model_dir, torch.float32, self._offload.name)
        else:
            self.model = AutoModelForCausalLM.from_pretrained(
                model_dir, dtype=torch.float32, attn_implementation="eager"
            ).eval()
        self.context = getattr(self.config, "max_position_embeddings", None) or getattr(self.config, "n_positions")

    def long_prompts(self, prompts: list[str], tokens: int) -> list[str]:
        """The prompts, plus for a model with a local attention window one that outgrows it."""
        window = getattr(self.config, "window_size", None)
        if not window or "local" not in str(getattr(self.config, "attention_layers", "")):
            return prompts
        text, joined = "", " ".join(prompts) or "The tenant shall keep the premises in good repair."
        while len(self.tokenizer(text).input_ids) < window + 16:
            text += joined + " "
        return [*prompts, text]

    def encode(self, text: str, tokens: int) -> list[int]:
        ids = self.tokenizer(text).input_ids
        return ids[-(self.context - tokens - 1) :]  # the prompt's end, where the answer starts

    def run(self, ids: list[int], tokens: int) -> tuple[np.ndarray, list[int], list[float]]:
        """Logits at every prompt position, then `tokens` greedy tokens through the KV cache with transformers'
        top-two margin at each."""
        import torch

        with torch.no_grad():
            out = self.model(input_ids=torch.tensor([ids]), use_cache=True)
            logits = out.logits[0].float().numpy()
            past, last = out.past_key_values, out.logits[0, -1].float()
            chosen, margins = [], []
            for _ in range(tokens):
                top = torch.topk(last, 2)
                chosen.append(int(top.indices[0]))
                margins.append(float(top.values[0] - top.values[1]))
                out = self.model(input_ids=torch.tensor([[chosen[-1]]]), past_key_values=past, use_cache=True)
                past, last = out.past_key_values, out.logits[0, -1].float()
        return logits, chosen, margins

    def close(self) -> None:
        del self.model
        if self._offload is not None:
            self._offload.cleanup()


def prompts_for(model_dir: Path, run_dir: Path | None, count: int = PROMPTS_MAX) -> list[str]:
    """Held-out prompts as the run rendered them (its samples.json), topped up with the merge gate's probe texts
    rendered with the model's chat template as one user turn."""
    from transformers import AutoTokenizer

    from finetune.adapters.gate import PROBES

    rendered = []
    samples = run_dir / "samples.json" if run_dir else None
    if samples and samples.is_file():
        rendered = [s["prompt"] for s in json.loads(samples.read_text(encoding="utf-8")).get("samples", [])]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    for probe in PROBES:
        if len(rendered) >= count:
            break
        if tokenizer.chat_template:
            rendered.append(
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": probe}], tokenize=False, add_generation_prompt=True
                )
            )
        else:
            rendered.append(probe)
    return rendered[:count]


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def _fp32_bytes(model_dir: Path) -> int:
    from finetune.adapters.gate import weight_bytes

    size, dtype = weight_bytes(model_dir, False), json.loads((model_dir / "config.json").read_text()).get("dtype")
    return size * (2 if dtype in ("bfloat16", "float16") else 1)
