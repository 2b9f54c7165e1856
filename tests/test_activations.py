"""The fused GELU: GPT-Neo and GPT-J load with one-kernel gelu_new modules giving the same logits and gradients,
while their config (what is saved, merged and exported) still says gelu_new; NeoX is left alone."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM
from transformers.activations import GELUTanh, NewGELUActivation

from finetune.models import load

FAMILIES = {"neo": "gpt_neo", "neox": "gpt_neox", "gptj": "gptj"}


def loaded(arch: str, path):
    cfg = OmegaConf.create(
        {
            "name_or_path": str(path),
            "family": FAMILIES[arch],
            "revision": "main",
            "dtype": "float32",
            "attn_implementation": "eager",
            "trust_remote_code": False,
            "pad_token": None,
            "hub_id": None,
        }
    )
    tokenizer = load.load_tokenizer(cfg)
    return load.load_model(cfg, tokenizer)


@pytest.mark.parametrize("arch", ["neo", "gptj"])
def test_gelu_new_runs_fused_with_the_same_logits_and_gradients(arch, tiny_models):
    ours = loaded(arch, tiny_models[arch])
    plain = AutoModelForCausalLM.from_pretrained(tiny_models[arch], dtype=torch.float32, attn_implementation="eager")
    kinds = {type(m) for m in ours.modules()}
    assert GELUTanh in kinds and NewGELUActivation not in kinds
    assert NewGELUActivation in {type(m) for m in plain.modules()}  # what transformers builds without us
    assert ours.config.activation_function == "gelu_new"  # saved, merged and exported checkpoints unchanged
    ids = torch.randint(0, ours.config.vocab_size, (2, 24))
    out_ours, out_plain = ours(ids, labels=ids), plain(ids, labels=ids)
    assert (out_ours.logits - out_plain.logits).abs().max().item() < 1e-5
    out_ours.loss.backward()
    out_plain.loss.backward()
    grads = dict(plain.named_parameters())
    worst = max((p.grad - grads[n].grad).abs().max().item() for n, p in ours.named_parameters() if p.grad is not None)
    assert worst < 1e-5


def test_neox_keeps_its_exact_gelu(tiny_models):
    model = loaded("neox", tiny_models["neox"])
    assert GELUTanh not in {type(m) for m in model.modules()}
