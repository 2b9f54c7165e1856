"""finetune.lm_head: on CPU the fused LM head projects only the trained positions, with trl's losses, gradients and
metrics unchanged. Without the wrapper trl's head projects every position of the batch (the saved-rows assertion)."""

from __future__ import annotations

import pytest
import torch

from finetune.models import lm_head

IGNORE = -100


def _projected_rows(forward, batch: dict, hidden_size: int) -> list[int]:
    """Row counts of the 2-D [positions, hidden] activations autograd saved during one fused forward: the head kernel
    saves the hidden states it projected."""
    rows = []

    def pack(tensor):
        if tensor.dim() == 2 and tensor.shape[-1] == hidden_size and tensor.requires_grad:
            rows.append(tensor.shape[0])
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward(**batch, fused_lm_head=True)
    return rows


def _lora_model(path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    add_fused_lm_head(model.get_base_model(), outputs=("log_probs", "entropy", "is_top1"))  # as trl's SFTTrainer does
    return model


def _batch(vocab_size: int) -> dict:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab_size, (3, 40), generator=generator)
    labels = ids.clone()
    labels[:, :25] = IGNORE  # prompt
    labels[2, 30:] = IGNORE  # padding of a shorter row
    mask = torch.ones_like(ids)
    mask[2, 30:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("arch", ["neo", "neox"])
def test_cpu_head_projects_only_trained_positions_with_trl_results(tiny_models, arch):
    model = _lora_model(tiny_models[arch])
    base = model.get_base_model()
    trl_forward = base.forward
    batch = _batch(model.config.vocab_size)
    trained = int((batch["labels"][:, 1:] != IGNORE).sum())
    positions = batch["labels"][:, 1:].numel()

    assert positions in _projected_rows(trl_forward, batch, model.config.hidden_size)  # trl on CPU: all 117 positions
    assert lm_head.compact_everywhere(model)
    assert base.forward is not trl_forward and lm_head.compact_everywhere(model)  # a second call keeps one wrapper
    rows = _projected_rows(model, batch, model.config.hidden_size)
    assert trained in rows and positions not in rows, rows

    results = {}
    for name, forward in (("trl", trl_forward), ("ours", model)):
        model.zero_grad()
        out = forward(**batch, fused_lm_head=True)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results[name] = (out, grads)
    (theirs, their_grads), (ours, our_grads) = results["trl"], results["ours"]
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.log_probs, theirs.log_probs, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.entropy, theirs.entropy, rtol=0, atol=1e-5)
    assert torch.equal(ours.is_top1, theirs.is_top1) and torch.equal(ours.label_mask, theirs.label_mask)
    assert their_grads.keys() == our_grads.keys() and len(our_grads) > 0
    for name in our_grads:  # the same math in another fp32 summation order (cpu_logprob): ~1e-6 of grads of ~0.3
        torch.testing.assert_close(our_grads[name], their_grads[name], rtol=1e-5, atol=2e-6, msg=name)

    # unfused: trl's path
    text = model.generate(input_ids=batch["input_ids"][:1, :5], max_new_tokens=3, do_sample=False)
    assert text.shape == (1, 8)


def test_all_masked_micro_batch_is_a_differentiable_zero(tiny_models):
    model = _lora_model(tiny_models["neox"])
    lm_head.compact_everywhere(model)
    batch = _batch(model.config.vocab_size)
    batch["labels"][:] = IGNORE
    out = model(**batch, fused_lm_head=True)
    out.loss.backward()
    assert out.loss.item() == 0.0 and all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("arch", ["neo", "gptj"])
def test_compact_head_gives_the_fields_the_trainer_asked_for(tiny_models, arch):
    """DPO asks trl's head for mean_logits and is_top1 (and log_sum_sq_probs with use_weighting), KTO for
    mean_logits, and indexes them: the compact path computes what was asked, equal to trl's own path (GPT-J: a head
    with a bias)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    asked = ("log_probs", "entropy", "mean_logits", "is_top1", "log_sum_sq_probs")  # DPO with use_weighting
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_models[arch], dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    add_fused_lm_head(model.get_base_model(), outputs=asked)
    trl_forward = model.get_base_model().forward
    assert lm_head.compact_everywhere(model)
    batch = _batch(model.config.vocab_size)
    with torch.no_grad():
        theirs, ours = trl_forward(**batch, fused_lm_head=True), model(**batch, fused_lm_head=True)
    for field in ("log_probs", "entropy", "mean_logits", "log_sum_sq_probs"):
        assert getattr(ours, field) is not None, field
        torch.testing.assert_close(getattr(ours, field), getattr(theirs, field), rtol=0, atol=1e-5, msg=field)
    assert torch.equal(ours.is_top1, theirs.is_top1)

    # mean_logits is the per-position mean over the vocabulary of the plain logits, on the trained positions
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    mask = batch["labels"][:, 1:] != IGNORE
    torch.testing.assert_close(ours.mean_logits, logits.mean(-1) * mask, rtol=0, atol=1e-5)


def test_compact_head_on_a_reference_model(tiny_models):
    """A separate ref_model gets trl's head with its default outputs (log-probs only): the wrapper applies to it as
    to a policy, and computes only that."""
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    ref = AutoModelForCausalLM.from_pretrained(tiny_models["neox"], dtype=torch.float32).eval()
    add_fused_lm_head(ref)  # as DPOTrainer / KTOTrainer do for ref_model
    trl_forward = ref.forward
    assert lm_head.compact_everywhere(ref)
    batch = _batch(ref.config.vocab_size)
    with torch.no_grad():
        theirs, ours = trl_forward(**batch, fused_lm_head=True), ref(**batch, fused_lm_head=True)
    torch.testing.assert_close(ours.log_probs, theirs.log_probs, rtol=0, atol=1e-5)
    assert ours.entropy is None and ours.mean_logits is None and ours.is_top1 is None
