"""Under bf16 autocast peft's cast of each LoRA input to the adapter's fp32 is undone by autocast at once; the
trainer switches it off for its steps (finetune.train.trainer.Guards): the same loss and gradients, bit for bit,
without two copies of every activation per LoRA layer."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from peft.helpers import disable_input_dtype_casting
from peft.tuners.lora import layer as lora_layer
from transformers import AutoModelForCausalLM

from helpers import tiny_overrides


def _step(model, ids, cast: bool):
    model.zero_grad()
    with disable_input_dtype_casting(model, active=not cast), torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_same_loss_and_gradients_without_the_cast(tiny_models):
    base = AutoModelForCausalLM.from_pretrained(tiny_models["neo"], dtype=torch.bfloat16)
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}  # peft keeps adapters fp32
    ids = torch.randint(3, model.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    loss_cast, grads_cast = _step(model, ids, cast=True)
    loss, grads = _step(model, ids, cast=False)
    assert torch.equal(loss, loss_cast)
    assert all(torch.equal(grads[name], grads_cast[name]) for name in grads) and len(grads) > 0


def test_a_bf16_run_trains_its_steps_without_the_cast(tiny_models, tmp_path, monkeypatch):
    from finetune.config.compose import compose
    from finetune.train.run import run

    seen = []
    forward = lora_layer.Linear.forward

    def spy(self, x, *args, **kwargs):
        if self.training:
            seen.append((self.cast_input_dtype_enabled, torch.is_autocast_enabled("cpu"), x.dtype))
        return forward(self, x, *args, **kwargs)

    monkeypatch.setattr(lora_layer.Linear, "forward", spy)
    overrides = ["model.dtype=bfloat16", "trainer.bf16=true", "trainer.max_steps=2", "sample_generations=0"]
    run_dir = run(compose("demo", tiny_overrides("neo", tiny_models["neo"], tmp_path / "run", *overrides)))
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert seen and all(flags == (False, True, torch.bfloat16) for flags in seen), set(seen)
