"""GPT-Neo attention through `torch.nn.functional.scaled_dot_product_attention`, local window and packing kept.

Why this module exists (transformers 5.25): GPT-Neo has only two attention paths.
- `eager` materialises the (batch, heads, q, k) scores in fp32, applies the layer's causal or windowed-local band,
  then softmax: O(T^2) memory per head and no fused kernel, on CPU and GPU alike.
- `flash_attention_2` ignores the 256-token window of the local layers, so past the window it computes a different
  model (refused by finetune.validate).

`NeoSdpaAttention` is the eager layer with only its attention product replaced: same parameters, buffers and cache
handling, so a checkpoint loads and saves unchanged. It keeps GPT-Neo's peculiarities: no 1/sqrt(head_dim) scaling
(scale=1.0), and each layer's own band (`bias`: causal for global layers, causal within `window_size` for local ones)
ANDed with the mask the model builds: a boolean (batch, 1, q, k) SDPA mask carrying padding and the block-diagonal
isolation of packed samples (position_ids restarting at 0, see finetune.data.packing), or None for a plain causal
batch, where global layers use `is_causal` (the flash kernel on GPU). Tested against the eager layer in
tests/test_neo_attention.py.

Registration, not relabelling: importing this module adds the layer to transformers' own dispatch table for GPT-Neo
(`GPT_NEO_ATTENTION_CLASSES["sdpa"]`, the table `GPTNeoAttention` builds its layer from; GPT-Neo does not go through
`AttentionInterface`) and declares `GPTNeoPreTrainedModel._supports_sdpa`. So "sdpa" is an attention implementation
transformers itself accepts for GPT-Neo: `from_pretrained(attn_implementation="sdpa")`, `GPTNeoForCausalLM(config)`,
`from_config`, deepcopy, save/reload and assisted generation all build this layer, and a GPT-Neo loaded without an
`attn_implementation` gets it (transformers' default is SDPA wherever a model declares it). `set_attn_implementation`
("eager" / "sdpa"), which transformers leaves a no-op for GPT-Neo, swaps the layers (transformers' own eager-vs-SDPA
test builds its eager side that way: without the swap it compared SDPA with itself). Each layer reads the
config's label at every call: labelled "eager" (what transformers asks for before `config.output_attentions = True`),
or asked for `output_attentions`, it computes the exact eager weights.

Masks are handed to SDPA as additive float masks built once per forward and layer type (`_shared_mask`): SDPA turns
a boolean mask into a float one on every call and autograd keeps each copy, one (batch, 1, q, k) tensor per layer
(GPT-Neo-125M, 4 x 2048 packed, fp32: 12 x 64 MiB); shared, every global layer keeps the same one and every local
layer another (one per window size: two models with different windows never share a band).
"""

from __future__ import annotations

import weakref

import torch
from torch.nn import functional as F
from transformers.models.gpt_neo import modeling_gpt_neo

NAME = "sdpa"  # what model.attn_implementation calls it for GPT-Neo; the mask format it asks transformers for


class NeoSdpaAttention(modeling_gpt_neo.GPTNeoSelfAttention):
    """GPT-Neo self-attention (global or windowed-local) computed by SDPA; eager only when weights are asked for."""

    def forward(
        self, hidden_states, attention_mask=None, layer_past=None, use_cache=False, output_attentions=False, **kwargs
    ):
        if output_attentions or self.config._attn_implementation == "eager":  # SDPA never forms the weights: eager does
            return super().forward(
                hidden_states, _additive(attention_mask, hidden_states.dtype), layer_past, use_cache, output_attentions
            )
        query = self._split_heads(self.q_proj(hidden_states), self.num_heads, self.head_dim)
        key = self._split_heads(self.k_proj(hidden_states), self.num_heads, self.head_dim)
        value = self._split_heads(self.v_proj(hidden_states), self.num_heads, self.head_dim)
        if layer_past is not None:
            key, value = layer_past.update(key, value, self.layer_id)
        q_len, k_len = query.size(-2), key.size(-2)
        mask = self._mask(attention_mask, q_len, k_len, query.dtype)
        output = F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=mask,
            dropout_p=self.attn_dropout.p if self.training else 0.0,
            is_causal=mask is None and q_len == k_len,
            scale=1.0,  # GPT-Neo does not scale its attention scores
        )
        output = self.resid_dropout(self.out_proj(self._merge_heads(output, self.num_heads, self.head_dim)))
        return output, None

    def _mask(self, attention_mask, q_len: int, k_len: int, dtype):
        """The model's mask ANDed with this layer's band, additive in `dtype`; None where plain causal attention is
        exact."""
        band = self.bias[:, :, k_len - q_len : k_len, :k_len]
        # everything the band depends on besides (q, k): its type and window (the offset k - q follows from the shape)
        layer_kind = ("global",) if self.attention_type == "global" else ("local", self.config.window_size)
        if attention_mask is None:
            if self.attention_type == "global" and (q_len == k_len or q_len == 1):
                return None  # is_causal, or one new token that sees the whole cache
            return _shared_mask(
                ("band", layer_kind, dtype, band.device), None, (q_len, k_len), lambda: _additive(band, dtype)
            )
        if attention_mask.dtype == torch.bool:
            allowed = (lambda: attention_mask) if self.attention_type == "global" else (lambda: attention_mask & band)
            return _shared_mask(
                ("mask", layer_kind, dtype), attention_mask, (q_len, k_len), lambda: _additive(allowed(), dtype)
            )
        return attention_mask.masked_fill(~band, torch.finfo(attention_mask.dtype).min)  # an eager-format mask


_SHARED: dict = {}  # key -> (weak ref to the model's mask it was built from, weak ref to the additive mask)


def _shared_mask(key: tuple, source, shape: tuple[int, int], build):
    """The additive mask for `key`, built once for as long as it is alive and (for a model mask) built from this very
    `source` tensor: the model hands the same mask object to every layer of a forward (and to checkpointed recomputes),
    so all layers of one type share one tensor, and autograd keeps one copy instead of one per layer. `shape` (q, k)
    stays out of the key, so generation's growing lengths replace one entry instead of adding one per length."""
    entry = _SHARED.get(key)
    if entry is not None:
        source_ref, mask_ref = entry
        mask = mask_ref()
        if mask is not None and mask.shape[-2:] == shape and (source_ref is None or source_ref() is source):
            return mask
    mask = build()
    _SHARED[key] = (None if source is None else weakref.ref(source), weakref.ref(mask))
    return mask


def _additive(attention_mask, dtype):
    """A boolean SDPA mask as the additive float mask the eager layer adds to its scores."""
    if attention_mask is None or attention_mask.dtype != torch.bool:
        return attention_mask
    zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
    return torch.where(attention_mask, zero, torch.finfo(dtype).min)


def register() -> None:
    """Make "sdpa" an attention implementation transformers accepts for GPT-Neo, built as NeoSdpaAttention
    (idempotent)."""
    modeling_gpt_neo.GPT_NEO_ATTENTION_CLASSES[NAME] = NeoSdpaAttention
    modeling_gpt_neo.GPTNeoPreTrainedModel._supports_sdpa = True
    # transformers' set_attn_implementation only logs a warning for GPT-Neo (no AttentionInterface) and changes
    # nothing; switching between "eager" and "sdpa" is a layer swap, which this module can do.
    if "set_attn_implementation" not in modeling_gpt_neo.GPTNeoPreTrainedModel.__dict__:
        modeling_gpt_neo.GPTNeoPreTrainedModel.set_attn_implementation = _set_attn_implementation


def _set_attn_implementation(self, attn_implementation, *args, **kwargs):
    """`model.set_attn_implementation` for GPT-Neo: "eager" <-> "sdpa" swap the layers; anything else as before."""
    requested = attn_implementation
    if isinstance(requested, dict):
        requested = requested.get("", self.config._attn_implementation)
    if requested in ("eager", NAME) and requested != self.config._attn_implementation:
        (disable if requested == "eager" else enable)(self)
        if self.config._attn_implementation == requested:
            return
    return modeling_gpt_neo.PreTrainedModel.set_attn_implementation(self, attn_implementation, *args, **kwargs)


def enable(model) -> int:
    """Use NeoSdpaAttention in every GPT-Neo attention layer of `model` (a bare, peft-wrapped or compiled model) and
    label its config(s) "sdpa", the mask format these layers take.

    The swap changes only the class of each layer (parameters and buffers stay), so it is safe before or after
    LoRA wrapping. Returns how many layers were switched (0 for other families, or when they already were: a GPT-Neo
    loaded with attn_implementation="sdpa", or with none, is built with this layer).
    """
    return _switch(model, modeling_gpt_neo.GPTNeoSelfAttention, NeoSdpaAttention, NAME)


def disable(model) -> int:
    """Back to transformers' eager GPT-Neo attention (for comparisons and `output_attentions`)."""
    return _switch(model, NeoSdpaAttention, modeling_gpt_neo.GPTNeoSelfAttention, "eager")


def _switch(model, old: type, new: type, label: str) -> int:
    layers = [module for module in model.modules() if type(module) is old]
    for module in layers:
        module.__class__ = new
    # the configs decide the mask format, and what a rebuild builds
    if any(type(module) is new for module in model.modules()):
        for module in model.modules():
            if isinstance(module, modeling_gpt_neo.GPTNeoPreTrainedModel):
                module.config._attn_implementation = label
    return len(layers)


register()
