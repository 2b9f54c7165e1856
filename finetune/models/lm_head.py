"""trl's fused LM head, made to project only the trained positions on every device.

trl 1.16's SFTTrainer replaces the model's forward with a fused LM head (`trl.trainer.utils.add_fused_lm_head`) that
never builds the [tokens x vocab] logits. On CUDA/XPU (its Triton kernels) it projects only the positions whose next
token is trained. On every other device it projects **every** position, prompt and padding included: on Neuron a
varying number of positions would recompile the graph. On CPU nothing recompiles, and instruction data trains about a
third of its positions (ChatDoctor rows: 35% of real tokens; the rest is prompt), so the head did ~3x the work:
GPT-Neo-125M's head (2,048 positions, 50,257 vocabulary, 31% trained) took 8.9 s per forward + backward instead of
2.9 s (benchmarks/RESULTS.md).

`compact_everywhere(model)` wraps trl's patched forward: fused calls on a device without Triton go through the same
kernel (`trl.kernels.ChunkedLogProbFunction`; on a CPU our faster `cpu_logprob.TokenLogProbs`, same fields and
semantics) on the trained positions only, scattered back to [batch, seq] exactly as
trl does on Triton devices. The kernel computes the per-token fields the trainer asked `add_fused_lm_head` for (SFT:
log-probs, entropy, top-1; DPO adds `mean_logits`, and `log_sum_sq_probs` with `use_weighting`; KTO log-probs,
entropy, `mean_logits`; a reference model only log-probs), read from trl's closure, so a trainer that indexes a field
finds it. It applies to a policy (bare or PeftModel) and to a separate `ref_model` alike. Everything else
(generation, non-fused calls, GPUs) is trl's forward unchanged. tests/test_lm_head.py checks equal losses, gradients
and metrics and that the kernel saw only the trained positions.
"""

from __future__ import annotations

import types

_ALL_OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")  # when trl hides its choice


def compact_everywhere(model, outputs: tuple[str, ...] | None = None) -> bool:
    """Wrap the fused forward trl put on `model`'s base model (a policy or a `ref_model`); False (nothing done) when
    there is none to wrap or the architecture scales its logits (softcapping, logit scale, MoE: kept on trl's path,
    none of them is in this family). `outputs` defaults to the per-token fields trl's head was asked for."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    trl_forward = base.__dict__.get("forward")  # add_fused_lm_head sets an instance attribute
    config = base.config.get_text_config()
    scaled = any(
        getattr(config, key, None) is not None
        for key in (
            "final_logit_softcapping",
            "logit_scale",
            "output_multiplier",
            "lm_head_multiplier",
            "logits_scaling",
        )
    )
    if trl_forward is None or scaled or getattr(config, "output_router_logits", False):
        return False
    if getattr(trl_forward, "_finetune_compact", False):
        return True
    options = {
        "outputs": tuple(outputs) if outputs is not None else _closure(trl_forward, "outputs", _ALL_OUTPUTS),
        "temperature": _closure(trl_forward, "temperature", 1.0),
        "fp32": _closure(trl_forward, "cast_lm_head_to_fp32", False),
    }

    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        from trl.kernels.chunked_logprob import _use_triton

        head = self.get_output_embeddings()
        if not fused_lm_head or shift_labels is not None or _use_triton(head.weight.device):
            return trl_forward(
                *args,
                fused_lm_head=fused_lm_head,
                labels=labels,
                shift_labels=shift_labels,
                num_items_in_batch=num_items_in_batch,
                **kwargs,
            )
        return _compact_fused(self, head, args, kwargs, labels, num_items_in_batch, **options)

    forward._finetune_compact = True
    base.forward = types.MethodType(forward, base)
    return True


def _closure(function, name: str, default):
    """A variable `add_fused_lm_head` closed its `_fused_forward` over (its arguments: outputs, temperature, ...)."""
    code = getattr(function, "__code__", None) or getattr(getattr(function, "__func__", None), "__code__", None)
    cells = getattr(function, "__closure__", None) or getattr(getattr(function, "__func__", None), "__closure__", None)
    if code is None or cells is None or name not in code.co_freevars:
        return default
    return cells[code.co_freevars.index(name)].cell_contents


def _compact_fused(model, head, args, kwargs, labels, num_items_in_batch, outputs, temperature, fp32):
    """trl's fused forward (trl/trainer/utils.py, `_fused_forward`) with its Triton-device branch taken everywhere."""
    from contextlib import nullcontext

    import torch
    from torch.distributed.tensor import DTensor
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE, FusedCausalLMOutput, maybe_gather_lm_head_ctx

    from finetune.models.cpu_logprob import TokenLogProbs

    kwargs["use_cache"] = False
    hidden = model.base_model(*args, **kwargs).last_hidden_state[:, :-1].to(head.weight.device)
    labels = labels[:, 1:].to(head.weight.device)
    mask = labels != -100
    autocast = nullcontext()
    if fp32:  # cast_lm_head_to_fp32, as trl does
        hidden = hidden.float()
        autocast = torch.autocast(hidden.device.type, enabled=False)
    weight, bias = head.weight, head.bias
    if isinstance(weight, DTensor):  # FSDP2 shards the head; gather it once, as trl does
        weight = weight.full_tensor()
        bias = bias.full_tensor() if bias is not None else None
    with autocast, maybe_gather_lm_head_ctx(weight, bias):  # ZeRO-3: the kernel reads the weight directly
        if hidden.device.type == "cpu":  # trl's kernel transliterated for CPUs is ~2x slower (cpu_logprob.py)
            per_token = TokenLogProbs.apply(hidden[mask], weight, bias, labels[mask], temperature, outputs)
        else:
            per_token = ChunkedLogProbFunction.apply(
                hidden[mask],
                weight,
                bias,
                labels[mask],
                temperature,
                _CHUNKED_LOGPROB_CHUNK_SIZE,
                None,
                1.0,
                outputs,
            )
    # masked_scatter keeps an all-masked micro-batch connected to the graph (a differentiable zero), as in trl
    log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1 = (
        None if x is None else x.new_zeros(mask.shape).masked_scatter(mask, x) for x in per_token
    )
    loss = -log_probs.sum() / (mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
    return FusedCausalLMOutput(
        loss=loss,
        log_probs=log_probs,
        entropy=entropy,
        log_sum_sq_probs=log_sum_sq_probs,
        mean_logits=mean_logits,
        is_top1=is_top1,
        label_mask=mask,
        aux_loss=None,
    )
