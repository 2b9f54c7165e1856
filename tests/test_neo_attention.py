"""finetune.neo_attention: SDPA GPT-Neo attention equals transformers' eager layer, past the local window.

The tiny GPT-Neo alternates global and local layers with a 32-token window; every sequence here is longer than
that, so a wrong band on the local layers, a 1/sqrt(d) scale GPT-Neo does not have, or a lost packing mask fails.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.models.gpt_neo import modeling_gpt_neo

from finetune.models import neo_attention

ATOL = 1e-5


@pytest.fixture(scope="module")
def pair(tiny_models):
    """(eager model, SDPA model) with the same fp32 weights."""
    eager = AutoModelForCausalLM.from_pretrained(
        tiny_models["neo"], dtype=torch.float32, attn_implementation="eager"
    ).eval()
    assert eager.config.window_size < 100 and "local" in eager.config.attention_layers
    fast = copy.deepcopy(eager)
    assert neo_attention.enable(fast) == eager.config.num_layers
    return eager, fast


def _ids(model, batch=3, length=100, seed=0):
    return torch.randint(3, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_enable_swaps_every_layer_and_keeps_the_weights(pair):
    eager, fast = pair
    layers = [m for m in fast.modules() if isinstance(m, modeling_gpt_neo.GPTNeoSelfAttention)]
    assert layers and all(type(m) is neo_attention.NeoSdpaAttention for m in layers)
    assert {m.attention_type for m in layers} == {"global", "local"}
    assert fast.config._attn_implementation == "sdpa" and eager.config._attn_implementation == "eager"
    assert fast.state_dict().keys() == eager.state_dict().keys()


@pytest.mark.parametrize("padding", ["none", "right"])
def test_forward_and_gradients_equal_eager_beyond_the_window(pair, padding):
    eager, fast = pair
    ids = _ids(eager)
    mask = torch.ones_like(ids)
    if padding == "right":
        mask[1, 70:] = 0
        mask[2, 45:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    results = []
    for model in (eager, fast):
        model.train()  # dropout is 0 in the tiny config; train() checks the training code path
        model.zero_grad()
        out = model(ids, attention_mask=None if padding == "none" else mask, labels=labels, use_cache=False)
        out.loss.backward()
        results.append((out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        model.eval()
    (logits_e, grads_e), (logits_f, grads_f) = results
    keep = mask.bool()
    assert torch.allclose(logits_e[keep], logits_f[keep], atol=ATOL)
    for name, grad in grads_e.items():
        assert torch.allclose(grad, grads_f[name], atol=ATOL), name


def test_left_padded_batch_equals_eager_on_real_tokens(pair):
    eager, fast = pair
    ids = _ids(eager)
    mask = torch.ones_like(ids)
    mask[2, :20] = 0
    with torch.no_grad():
        logits_e = eager(ids, attention_mask=mask).logits
        logits_f = fast(ids, attention_mask=mask).logits
    assert not torch.isnan(logits_f).any()  # fully masked padding queries must not poison anything
    assert torch.allclose(logits_e[mask.bool()], logits_f[mask.bool()], atol=ATOL)


def test_packed_samples_are_isolated_and_equal_eager(pair):
    eager, fast = pair
    ids = _ids(eager, batch=2)
    positions = torch.cat([torch.arange(60), torch.arange(40)]).expand(2, -1)  # two samples per row, both > window
    with torch.no_grad():
        packed_e = eager(ids, position_ids=positions, use_cache=False).logits
        packed_f = fast(ids, position_ids=positions, use_cache=False).logits
        alone = fast(ids[:, 60:], use_cache=False).logits
        first_alone = fast(ids[:, :60], use_cache=False).logits
    assert torch.allclose(packed_e, packed_f, atol=ATOL)
    assert torch.allclose(packed_f[:, 60:], alone, atol=ATOL)  # the second sample never sees the first
    assert torch.allclose(packed_f[:, :60], first_alone, atol=ATOL)


def test_generation_with_kv_cache_equals_eager(pair):
    eager, fast = pair
    prompt = _ids(eager, length=40)
    mask = torch.ones_like(prompt)
    mask[2, :8] = 0  # left padding, as batched generation pads
    settings = dict(attention_mask=mask, max_new_tokens=50, do_sample=False, pad_token_id=0)  # past the window
    with torch.no_grad():
        by_eager = eager.generate(prompt, **settings, output_scores=True, return_dict_in_generate=True)
        by_fast = fast.generate(prompt, **settings, output_scores=True, return_dict_in_generate=True)
    assert torch.equal(by_eager.sequences, by_fast.sequences)
    assert torch.allclose(torch.stack(by_eager.scores), torch.stack(by_fast.scores), atol=1e-4)


def test_attention_weights_requested_fall_back_to_eager(pair):
    eager, fast = pair
    ids = _ids(eager, batch=1)
    with torch.no_grad():
        weights_e = eager(ids, output_attentions=True).attentions
        weights_f = fast(ids, output_attentions=True).attentions
    assert len(weights_f) == len(weights_e)
    for a, b in zip(weights_e, weights_f):
        assert torch.allclose(a, b, atol=ATOL)


def test_disable_restores_the_eager_layer(pair):
    _, fast = pair
    back = copy.deepcopy(fast)
    assert neo_attention.disable(back) == back.config.num_layers
    assert back.config._attn_implementation == "eager"
    assert not any(type(m) is neo_attention.NeoSdpaAttention for m in back.modules())


@pytest.mark.parametrize("padding", ["none", "right"])
def test_layers_of_one_type_share_one_additive_mask_kept_for_backward(pair, padding):
    """SDPA turns a boolean mask into a float one per call and autograd keeps each: one (b, 1, q, k) tensor per layer.
    neo_attention hands every layer of a type the same additive mask, so the graph keeps at most two."""
    _, fast = pair
    ids = _ids(fast, batch=2, length=64)
    mask = torch.ones_like(ids)
    mask[1, 40:] = 0
    square = set()

    def pack(tensor):
        if tensor.dim() == 4 and tensor.shape[-2:] == (64, 64) and tensor.is_floating_point():
            square.add(tensor.untyped_storage().data_ptr())
        return tensor

    fast.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fast(ids, attention_mask=None if padding == "none" else mask, use_cache=False)
    fast.eval()
    local_layers = sum(t == "local" for t in fast.config.attention_layers)
    assert local_layers >= 2 and fast.config.num_layers > 2
    # the local band (global layers are is_causal); global + local
    assert len(square) == (1 if padding == "none" else 2)


def _neo(window: int, seed: int = 0):
    """(eager, SDPA) GPT-Neo pair built from a config with this local window: 2 global + 2 local layers."""
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    config = GPTNeoConfig(
        vocab_size=97,
        hidden_size=32,
        num_layers=4,
        num_heads=4,
        attention_types=[[["global", "local"], 2]],
        window_size=window,
        max_position_embeddings=64,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    eager = GPTNeoForCausalLM(config).eval()
    fast = copy.deepcopy(eager)
    assert neo_attention.enable(fast) == 4
    return eager, fast


def _sdpa_layers(model) -> int:
    return sum(type(m) is neo_attention.NeoSdpaAttention for m in model.modules())


def test_transformers_builds_the_enabled_model_again_from_its_config(pair, tmp_path):
    """Registration, not relabelling: every public way of building a GPT-Neo from an enabled model's config works and
    builds the SDPA layer (transformers refused all of these while "sdpa" was only a label on the config)."""
    eager, fast = pair
    from transformers import GPTNeoForCausalLM

    fast.save_pretrained(tmp_path / "saved")
    built = {
        "constructor": GPTNeoForCausalLM(fast.config),
        "from_config": AutoModelForCausalLM.from_config(copy.deepcopy(fast.config)),
        "from_pretrained with the config": AutoModelForCausalLM.from_pretrained(tmp_path / "saved", config=fast.config),
        "from_pretrained sdpa": AutoModelForCausalLM.from_pretrained(tmp_path / "saved", attn_implementation="sdpa"),
        "deepcopy": copy.deepcopy(fast),
    }
    ids = _ids(eager, batch=2)
    with torch.no_grad():
        expected = eager(ids).logits
        for how, model in built.items():
            assert _sdpa_layers(model) == eager.config.num_layers, how
            model.load_state_dict(fast.state_dict())
            assert torch.allclose(model.eval()(ids).logits, expected, atol=ATOL), how


@pytest.mark.parametrize("mode", ["greedy", "sample", "beam", "assisted"])
def test_every_decoding_mode_equals_eager(pair, mode):
    eager, fast = pair
    prompt = _ids(eager, batch=2, length=30)
    mask = torch.ones_like(prompt)
    mask[1, :5] = 0
    settings = {
        "greedy": dict(do_sample=False),
        "sample": dict(do_sample=True, top_k=20),
        "beam": dict(do_sample=False, num_beams=3),
        "assisted": dict(do_sample=False),
    }[mode]
    if mode == "assisted":
        prompt, mask = prompt[:1, 5:], mask[:1, 5:]  # assisted generation takes one sequence
    outputs = []
    for model in (eager, fast):
        extra = {"assistant_model": copy.deepcopy(model)} if mode == "assisted" else {}
        torch.manual_seed(0)
        with torch.no_grad():
            outputs.append(
                model.generate(prompt, attention_mask=mask, max_new_tokens=40, pad_token_id=0, **settings, **extra)
            )
    assert torch.equal(*outputs)


def test_config_labelled_eager_gives_the_exact_eager_weights(pair):
    """What transformers asks before `config.output_attentions = True` on an SDPA model (set the label to eager)."""
    eager, fast = pair
    model = copy.deepcopy(fast)
    model.config._attn_implementation = "eager"
    model.config.output_attentions = True
    ids = _ids(eager, batch=2)
    with torch.no_grad():
        expected = eager(ids, output_attentions=True).attentions
        got = model(ids).attentions
    assert got is not None and len(got) == len(expected)
    assert all(torch.allclose(a, b, atol=ATOL) for a, b in zip(expected, got))


def test_gradient_checkpointing_equals_eager(pair):
    eager, fast = pair
    ids = _ids(eager, batch=2)
    grads = []
    for model in (eager, copy.deepcopy(fast)):
        model = copy.deepcopy(model)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        model(ids, labels=ids, use_cache=False).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        assert torch.allclose(grad, grads[1][name], atol=ATOL), name


def test_two_models_with_different_windows_alive_at_once_each_equal_eager():
    """The shared band is keyed by the window: model B (window 8) must not reuse model A's band (window 3) while A's
    graph is alive. 16 tokens, longer than both windows; with gradients on, plain, left-padded, packed, KV cache."""
    (eager_a, fast_a), (eager_b, fast_b) = _neo(3, seed=1), _neo(8, seed=2)
    ids = torch.randint(3, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    left = torch.ones_like(ids)
    left[1, :4] = 0
    packed = torch.cat([torch.arange(9), torch.arange(7)]).expand(2, -1)
    cases = {"plain": {}, "left padding": {"attention_mask": left}, "packed": {"position_ids": packed}}
    for case, inputs in cases.items():
        alive = fast_a(ids, use_cache=False, **inputs).logits  # A's graph (and its masks) stay alive below
        for eager, fast in ((eager_b, fast_b), (eager_a, fast_a)):
            got, want = fast(ids, use_cache=False, **inputs).logits, eager(ids, use_cache=False, **inputs).logits
            keep = inputs.get("attention_mask", torch.ones_like(ids)).bool()
            assert (got - want)[keep].abs().max() < ATOL, case
        assert alive.requires_grad
    for eager, fast in ((eager_b, fast_b), (eager_a, fast_a)):  # KV cache: one token at a time past both windows
        with torch.no_grad():
            settings = dict(
                attention_mask=left,
                max_new_tokens=12,
                do_sample=False,
                pad_token_id=0,
                output_scores=True,
                return_dict_in_generate=True,
            )
            by_eager, by_fast = eager.generate(ids, **settings), fast.generate(ids, **settings)
        assert torch.equal(by_eager.sequences, by_fast.sequences)
        assert torch.allclose(torch.stack(by_eager.scores), torch.stack(by_fast.scores), atol=ATOL)


def test_set_attn_implementation_swaps_the_layers_both_ways(pair):
    """transformers' public switch (a logged no-op for GPT-Neo on its own): its eager-vs-SDPA test relies on it."""
    eager, fast = pair
    model = copy.deepcopy(fast)
    model.set_attn_implementation("eager")
    assert _sdpa_layers(model) == 0 and model.config._attn_implementation == "eager"
    ids = _ids(eager, batch=2)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, eager(ids).logits)  # the very eager layer, not SDPA labelled eager
        model.set_attn_implementation("sdpa")
        assert _sdpa_layers(model) == eager.config.num_layers and model.config._attn_implementation == "sdpa"
        assert torch.allclose(model(ids).logits, eager(ids).logits, atol=ATOL)
