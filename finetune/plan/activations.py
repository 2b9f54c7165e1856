"""Activation memory of one micro-batch: the tensors each layer keeps for backward, worked out per family from the
transformers/peft/trl code this project pins, at the config's micro-batch and max_length, with and without gradient
checkpointing, plus the working set at the moment of the peak (trl's fused LM head, which never builds the
b x s x vocab logits, or one layer's backward). On CUDA the dtypes follow bf16 autocast (fp32 LayerNorm, pow and
softmax outputs, bf16 matmuls); on CPU everything is fp32. Checked against real layers by tests/test_plan.py and
benchmarks/plan_accuracy.py."""

from __future__ import annotations

from dataclasses import dataclass

from finetune.plan.architecture import LINEAR_INPUTS, Adapter, Architecture
from finetune.plan.setup import Setup, adapter_bytes

HEAD_TILE_ROWS, HEAD_TILE_COLS = 4096, 32768  # trl.kernels.chunked_logprob: tokens x vocabulary per projection tile
# On a CPU the head runs finetune.models.cpu_logprob: rows of the whole vocabulary, LOGIT_CHUNK_ELEMENTS fp32 logits
# at a time, of which it keeps two fp32 copies at once besides the GEMM's output (forward: logits and log-probs;
# backward: logits and softmax), and when the head trains, one more for its weight-gradient GEMM.
CPU_HEAD_FP32_CHUNKS = 2
CPU_HEAD_WEIGHT_GRAD_CHUNKS = 1


@dataclass
class Activations:
    peak: int
    peak_at: str
    kept_after_forward: int
    """What the forward leaves for backward (no working set): checked directly by benchmarks/plan_accuracy.py."""
    with_checkpointing: int
    without_checkpointing: int


def activations(arch: Architecture, adapter_: Adapter | None, setup: Setup) -> Activations:
    """Peak activation memory of one micro-batch: the tensors kept for backward plus the working set of the moment the
    peak happens (trl's LM head or one layer's backward)."""
    with_ckpt = _activation_phases(arch, adapter_, setup, checkpointing=True)
    without = _activation_phases(arch, adapter_, setup, checkpointing=False)
    peak, at, kept = with_ckpt if setup.checkpointing else without
    return Activations(peak, at, kept, with_ckpt[0], without[0])


def _activation_phases(
    arch: Architecture, adapter_: Adapter | None, setup: Setup, checkpointing: bool
) -> tuple[int, str, int]:
    tokens = setup.forward_rows * setup.max_length
    wrapped = adapter_.wrapped if adapter_ else [()] * arch.layers
    per_layer = [layer_saved_bytes(arch, adapter_, set(names), setup) for names in wrapped]
    backward = max(layer_backward_bytes(arch, setup))
    head_saved, head_forward, head_backward = head_bytes(arch, setup, adapter_ is None)
    kept = model_saved_bytes(arch, setup) + head_saved
    if checkpointing:
        # without autocast the recomputed layer keeps its checkpointed input itself, not a copy
        shared_input = 0 if setup.norm_input_copy else tokens * arch.hidden * setup.weight_bytes
        inputs = arch.layers * tokens * arch.hidden * setup.weight_bytes  # each layer's input, kept by the checkpoint
        after_forward = inputs + kept
        phases = {
            "the LM head's backward": inputs + kept + head_backward,
            "the end of forward (LM head)": inputs + kept + head_forward,
            "a recomputed layer's backward": inputs + kept - head_saved + max(per_layer) - shared_input + backward,
        }
    else:
        layers = sum(per_layer)
        after_forward = layers + kept
        phases = {
            "the LM head's backward": layers + kept + head_backward,
            "the end of forward (LM head)": layers + kept + head_forward,
            "the last layer's backward": layers + kept - head_saved + backward,
        }
    at = max(phases, key=phases.get)
    return int(phases[at]), at, int(after_forward)


def layer_saved_bytes(arch: Architecture, adapter_: Adapter | None, wrapped: set, setup: Setup) -> int:
    """Bytes one layer keeps for backward at the config's micro-batch and length. Each term names the op that keeps
    it; the bytes follow the dtypes autocast (CUDA) or plain fp32 (CPU) give those tensors."""
    h, f, heads = arch.hidden, arch.inner, arch.heads
    tokens = setup.forward_rows * setup.max_length
    norms = 1 if arch.family == "gptj" else 2
    per_token = 8 * norms  # fp32 mean and rstd of each LayerNorm
    if setup.norm_input_copy:
        per_token += 4 * h * norms  # autocast runs layer_norm in fp32 on a copy of the bf16 input, and keeps the copy
    else:
        per_token += setup.weight_bytes * h  # the layer input, kept by the first LayerNorm
        if not arch.parallel_residual:
            per_token += setup.weight_bytes * h  # the second LayerNorm's input is a new sum (attention + residual)
    linear_part, scores_per_head_pair, mask_per_pair = attention_saved(arch, setup)
    per_token += linear_part
    act_saved, act_out = activation_function_bytes(arch.activation, setup)
    per_token += act_saved * f
    per_token += linear_inputs_saved(arch, adapter_, wrapped, setup, act_out)
    scores = (scores_per_head_pair * heads + mask_per_pair) * setup.forward_rows * setup.max_length**2
    rotary_tables = (
        16 * arch.rotary_dim * setup.max_length if arch.family == "gptj" else 0
    )  # GPT-J: sin/cos per layer, fp32
    return int(per_token * tokens + scores + rotary_tables)


def attention_saved(arch: Architecture, setup: Setup) -> tuple[float, int, int]:
    """(bytes per token, per element of the b x heads x s x s scores, per element of a b x s x s mask) attention
    keeps for backward."""
    h, compute = arch.hidden, setup.compute_bytes
    if setup.attention in ("eager",):
        # GPT-Neo and GPT-J upcast query and key to fp32 before the matmul; autocast casts them back to bf16 copies
        qk_bytes = (compute if setup.autocast else 4) if arch.family in ("gpt_neo", "gptj") else compute
        # fp32 softmax output, plus its copy in the value's dtype when that is not fp32
        scores = 4 + (compute if compute != 4 else 0)
        return 2 * qk_bytes * h + compute * h, scores, 0
    # sdpa / flash-attention: query, key, value and the output kept, plus an fp32 logsumexp per head; no s x s scores.
    # NeoX's value is a view of the fused query_key_value output, so the whole 3*h output stays alive (the rotary
    # query and key are new tensors); with use_cache (never in training) the cache would copy the value instead.
    # A padded batch comes with a boolean mask, which sdpa turns into an additive one in the query's dtype, per layer;
    # GPT-Neo's layers (finetune.neo_attention) share one additive mask per layer type instead (model_saved_bytes).
    value = 3 * compute * h if arch.family == "gpt_neox" else compute * h
    return 2 * compute * h + value + compute * h + 4 * arch.heads, 0, 0 if arch.family == "gpt_neo" else compute


def activation_function_bytes(name: str, setup: Setup) -> tuple[int, int]:
    """(bytes kept per element of the MLP's inner width, bytes of the activation's output)."""
    compute = setup.compute_bytes
    if name == "gelu_new":  # 0.5*x*(1 + tanh(c*(x + 0.044715*x**3))): x (for pow), tanh, 1+tanh, 0.5*x
        if setup.autocast:
            return 4 + 4 + 4 + compute, 4  # autocast runs pow in fp32: the fp32 chain follows
        return 4 * compute, compute
    if name == "gelu_fast":  # 0.5*x*(1 + tanh(x*0.798*(1 + 0.044715*x*x))): seven intermediates kept
        return 7 * compute, compute
    return compute, compute  # torch's fused gelu (and relu/silu): keeps its input


def linear_inputs_saved(
    arch: Architecture, adapter_: Adapter | None, wrapped: set, setup: Setup, act_out: int
) -> float:
    """Bytes per token the layer's Linears keep: a trainable weight needs its input; an adapter keeps its dropout's
    output and mask; a frozen Linear (bf16 or 4-bit) keeps nothing."""
    roles = LINEAR_INPUTS[arch.family]
    role_bytes = {"ln1": setup.norm_bytes, "ln2": setup.norm_bytes, "attn": setup.compute_bytes, "act": act_out}
    lora_bytes = adapter_bytes(setup)
    shared, per_token = {}, 0.0
    # GPT-Neo under SDPA (finetune.neo_attention): the kernels return the output in (b, s, heads, d) memory, so merging
    # the heads is a view and out_proj's input is the attention output attention_saved already counts.
    counted = {"attn"} if arch.family == "gpt_neo" and setup.attention != "eager" else set()
    for name, (fan_in, fan_out) in arch.layer_linears.items():
        role = roles[name]
        if adapter_ is None:  # full fine-tuning: every weight trains
            if setup.autocast and role_bytes[role] != setup.compute_bytes:
                per_token += setup.compute_bytes * fan_in  # each Linear keeps its own bf16 cast of an fp32 input
            elif role not in counted:
                shared[role] = role_bytes[role] * fan_in  # Linears reading the same tensor keep it once
        elif name in wrapped:
            if adapter_.dropout > 0:
                per_token += dropout_bytes(setup, lora_bytes) * fan_in
            elif setup.autocast:
                per_token += setup.compute_bytes * fan_in
            elif role_bytes[role] == lora_bytes:
                shared[role] = 0 if role in counted else role_bytes[role] * fan_in
            else:
                per_token += lora_bytes * fan_in  # peft casts the input to the adapter's dtype
            low_rank = setup.compute_bytes if setup.autocast else lora_bytes
            per_token += low_rank * adapter_.rank  # lora_B's input
            if adapter_.dora:
                per_token += 2 * low_rank * fan_out  # base and adapter outputs, kept for the magnitude's gradient
    return per_token + sum(shared.values())


def dropout_bytes(setup: Setup, lora_bytes: int) -> int:
    """Per element of an adapter's input: CUDA dropout keeps a 1-byte mask, CPU dropout a noise tensor in the input's
    dtype; lora_A keeps the dropped input (as autocast's bf16 copy under autocast)."""
    kept_input = setup.compute_bytes if setup.autocast else lora_bytes
    return (1 if setup.device == "cuda" else lora_bytes) + kept_input


def layer_backward_bytes(arch: Architecture, setup: Setup) -> tuple[int, int]:
    """Working set of one layer's backward: gradients of the MLP's widest tensors (3 of them, fp32 or compute dtype)
    and, for eager attention, the softmax backward's fp32 gradient in and out (plus the gradient of the scores'
    bf16 copy under autocast)."""
    tokens = setup.forward_rows * setup.max_length
    grad = max(setup.compute_bytes, 4 if setup.autocast else setup.compute_bytes)
    mlp = 3 * grad * arch.inner * tokens + 2 * setup.weight_bytes * arch.hidden * tokens
    score_grads = 2 * 4 + (setup.compute_bytes if setup.compute_bytes != 4 else 0)
    scores = score_grads * setup.forward_rows * arch.heads * setup.max_length**2 if setup.attention == "eager" else 0
    return mlp, scores + 2 * setup.weight_bytes * arch.hidden * tokens


def model_saved_bytes(arch: Architecture, setup: Setup) -> int:
    """Outside the layers: input ids, labels and mask (int64), the final LayerNorm's input and statistics, NeoX's
    rotary cos/sin, the attention mask transformers builds once per forward and GPT-Neo's two shared additive masks."""
    tokens = setup.forward_rows * setup.max_length
    final_norm = (4 if setup.norm_input_copy else setup.weight_bytes) * arch.hidden + 8
    rotary = 2 * arch.rotary_dim * setup.compute_bytes if arch.family == "gpt_neox" else 0
    mask = setup.forward_rows * setup.max_length**2 * (1 if setup.attention != "eager" else setup.weight_bytes)
    if (
        arch.family == "gpt_neo" and setup.attention != "eager"
    ):  # one additive mask per layer type, shared (global, local)
        mask += 2 * setup.forward_rows * setup.max_length**2 * setup.compute_bytes
    return tokens * (24 + final_norm + rotary) + mask


def head_bytes(arch: Architecture, setup: Setup, full: bool) -> tuple[int, int, int]:
    """The fused LM head (trl.trainer.utils.add_fused_lm_head, finetune.models.lm_head): (kept for backward, forward
    working set, backward working set). On a GPU trl projects 4096 tokens x 32768 vocabulary entries at a time and a
    Triton kernel folds each tile in place; on a CPU cpu_logprob projects whole-vocabulary rows, a fixed number of
    fp32 logits at a time, and keeps a few fp32 copies of that chunk. The b x s x vocab logits never exist."""
    from finetune.models.cpu_logprob import rows_per_chunk

    tokens = setup.forward_rows * setup.max_length
    cpu = setup.device == "cpu"
    if cpu:
        rows, cols = min(tokens, rows_per_chunk(arch.vocab)), arch.vocab
    else:
        rows, cols = min(tokens, HEAD_TILE_ROWS), min(arch.vocab, HEAD_TILE_COLS)
    buffer = rows * cols * setup.compute_bytes
    fp32_tile = rows * cols * 4
    fp32_tiles = CPU_HEAD_FP32_CHUNKS if cpu else 0
    kept = tokens * arch.hidden * setup.norm_bytes  # the final norm's output rows, copied for the head
    chunk_cast = rows * arch.hidden * setup.compute_bytes if setup.norm_bytes != setup.compute_bytes else 0
    forward = buffer + chunk_cast + fp32_tiles * fp32_tile
    backward = buffer + chunk_cast + fp32_tiles * fp32_tile + tokens * arch.hidden * 4  # fp32 gradient of the rows
    if full:  # the head's weight gradient, accumulated in fp32 then cast to the weight's dtype
        backward += arch.vocab * arch.hidden * (4 + setup.weight_bytes)
        backward += CPU_HEAD_WEIGHT_GRAD_CHUNKS * fp32_tile if cpu else 0
    return kept, forward, backward
