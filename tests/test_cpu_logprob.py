"""finetune.models.cpu_logprob: the CPU LM-head kernel gives what full logits give (values and gradients, entropy's
included, with a bias, a temperature, a trainable head and rows split into chunks), and what trl's kernel gives under
bf16 autocast."""

from __future__ import annotations

import pytest
import torch
from trl.kernels import ChunkedLogProbFunction

from finetune.models import cpu_logprob
from finetune.models.cpu_logprob import TokenLogProbs

ALL = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def _inputs(n=37, hidden=24, vocab=211, bias=True):
    generator = torch.Generator().manual_seed(0)
    h = torch.randn(n, hidden, generator=generator, dtype=torch.float64).float()
    w = (torch.randn(vocab, hidden, generator=generator) * 0.3).requires_grad_(True)
    b = (torch.randn(vocab, generator=generator) * 0.1).requires_grad_(True) if bias else None
    targets = torch.randint(0, vocab, (n,), generator=generator)
    with torch.no_grad():
        targets[::3] = (h @ w.t()).argmax(-1)[::3]  # a third of the rows predicted right (is_top1 true)
    return h.requires_grad_(True), w, b, targets


def _reference(h, w, b, targets, temperature):
    z = (h @ w.t() + (b if b is not None else 0)) / temperature
    log_p = torch.log_softmax(z, -1)
    p = log_p.exp()
    return {
        "log_probs": log_p.gather(-1, targets[:, None]).squeeze(-1),
        "entropy": -(p * log_p).sum(-1),
        "log_sum_sq_probs": torch.log((p * p).sum(-1)),
        "mean_logits": z.mean(-1),
        "is_top1": z.argmax(-1) == targets,
    }


@pytest.mark.parametrize("chunk_rows", [None, 5])  # 5: the rows go in 8 chunks, the last one short
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_equals_full_logits_values_and_gradients(monkeypatch, chunk_rows, temperature):
    if chunk_rows:
        monkeypatch.setattr(cpu_logprob, "LOGIT_CHUNK_ELEMENTS", 211 * chunk_rows)
    h, w, b, targets = _inputs()
    ours = dict(zip(ALL, TokenLogProbs.apply(h, w, b, targets, temperature, ALL)))
    grad_lp, grad_ent = torch.randn(37), torch.randn(37)
    (ours["log_probs"] * grad_lp + ours["entropy"] * grad_ent).sum().backward()
    our_grads = [t.grad.clone() for t in (h, w, b)]
    for t in (h, w, b):
        t.grad = None
    expected = _reference(h, w, b, targets, temperature)
    (expected["log_probs"] * grad_lp + expected["entropy"] * grad_ent).sum().backward()
    for name in ALL[:4]:
        torch.testing.assert_close(ours[name], expected[name], rtol=1e-5, atol=1e-5, msg=name)
    assert torch.equal(ours["is_top1"], expected["is_top1"]) and ours["is_top1"].any()
    for name, mine, theirs in zip(("hidden", "weight", "bias"), our_grads, (h.grad, w.grad, b.grad)):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5, msg=name)
    assert not ours["mean_logits"].requires_grad and not ours["is_top1"].requires_grad  # metrics, as in trl


def test_asks_only_what_it_is_asked_and_a_frozen_head_gets_no_gradient():
    h, w, b, targets = _inputs(bias=False)
    w.requires_grad_(False)
    log_probs, entropy, sq, mean, top1 = TokenLogProbs.apply(h, w, None, targets, 1.0, ("log_probs",))
    assert entropy is None and sq is None and mean is None and top1 is None
    log_probs.sum().backward()
    assert h.grad is not None and h.grad.abs().sum() > 0 and w.grad is None


def test_matches_trls_kernel_under_bf16_autocast():
    h, w, _, targets = _inputs(n=300, hidden=64, vocab=4099, bias=False)
    w.requires_grad_(False)
    outputs = ("log_probs", "entropy", "is_top1")
    results = []
    for kernel in ("trl", "ours"):
        h.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if kernel == "trl":
                out = ChunkedLogProbFunction.apply(h, w, None, targets, 1.0, 32768, None, 1.0, outputs)
            else:
                out = TokenLogProbs.apply(h, w, None, targets, 1.0, outputs)
        (-out[0].sum()).backward()
        results.append((out, h.grad.clone()))
    (theirs, their_grad), (ours, our_grad) = results
    torch.testing.assert_close(ours[0], theirs[0], rtol=0, atol=1e-5)  # the same bf16 logits, fp32 from there
    torch.testing.assert_close(ours[1], theirs[1], rtol=0, atol=1e-4)
    assert torch.equal(ours[4], theirs[4])
    # ours rounds the hidden gradient to bf16 once, as autograd's linear backward under autocast does; trl keeps fp32
    torch.testing.assert_close(our_grad, their_grad, rtol=1e-2, atol=1e-3)
