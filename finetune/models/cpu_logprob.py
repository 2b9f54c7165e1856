"""Per-token log-probabilities of the LM head on devices without Triton, shaped for a CPU.

trl's `ChunkedLogProbFunction` is a Triton kernel; on a CPU it runs a transliteration of it (`_forward_tile`,
`_backward_tile`): about twenty full-size elementwise passes over every [tokens x vocabulary] tile, an online
logsumexp meant for GPU blocks, and its gradient GEMMs in fp32 even under bf16 autocast. On the issue-26 setup
(GPT-Neo 4 x 256, an 8k vocabulary, ~1,000 trained positions per step) that head took 5.3 s of a 16.7-s epoch
(py-spy); alone, 140 ms per step forward and backward, of which its matrix products are about 40.

`TokenLogProbs` computes the same fields (trl's semantics) with whole-vocabulary rows: one `log_softmax`, two
`gather`s, and the optional metrics from the same logits; the backward recomputes the logits, turns them into
`softmax - onehot` in place, and runs its GEMMs in the autocast dtype, as autograd's own backward of a linear layer
under autocast would (one GEMM over the whole vocabulary, rounded once; trl's fp32 accumulation guards against
rounding each vocabulary chunk's product). Rows go in chunks so the [rows x vocabulary] fp32 logits stay near 64 MiB
whatever the vocabulary. Entropy keeps its gradient (trl's does); log(sum p^2), the mean logit and top-1 are metrics
(non-differentiable, as in trl). tests/test_cpu_logprob.py holds it equal to plain logits (values and gradients) and
to trl's kernel under bf16 autocast; tests/test_lm_head.py, a whole LoRA model's loss and gradients to trl's path.
"""

from __future__ import annotations

import torch

LOGIT_CHUNK_ELEMENTS = 16 * 1024 * 1024  # fp32 logits per row chunk: 64 MiB, whatever the vocabulary


def rows_per_chunk(vocab: int) -> int:
    return max(1, LOGIT_CHUNK_ELEMENTS // vocab)


class TokenLogProbs(torch.autograd.Function):
    """`apply(hidden, weight, bias, targets, temperature, outputs)`: (log_probs, entropy, log_sum_sq_probs,
    mean_logits, is_top1) of `(hidden @ weight.T + bias) / temperature` at `targets`, as trl's
    `ChunkedLogProbFunction` returns them; a field not in `outputs` is None. No softcapping or logit scale (no model
    of this family has them; lm_head.py keeps such models on trl's path)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, outputs):
        ctx.set_materialize_grads(False)
        device = hidden.device
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else hidden.dtype
        w = weight.to(dtype)
        n, vocab = hidden.shape[0], weight.shape[0]
        log_z = torch.empty(n, device=device, dtype=torch.float32)
        fields = {name: torch.empty(n, device=device, dtype=torch.float32) for name in outputs if name != "is_top1"}
        fields["log_probs"] = torch.empty(n, device=device, dtype=torch.float32)
        top1 = torch.empty(n, device=device, dtype=torch.bool) if "is_top1" in outputs else None
        step = rows_per_chunk(vocab)
        for start in range(0, n, step):
            rows = slice(start, min(start + step, n))
            z = _logits(hidden[rows], w, bias, dtype, temperature)
            target = targets[rows].unsqueeze(-1)
            if "mean_logits" in fields:
                fields["mean_logits"][rows] = z.mean(-1)
            if top1 is not None:
                top1[rows] = z.argmax(-1) == targets[rows]  # the first maximum, as trl counts a tie
            log_p = torch.log_softmax(z, -1)
            fields["log_probs"][rows] = log_p.gather(-1, target).squeeze(-1)
            log_z[rows] = z.gather(-1, target).squeeze(-1) - fields["log_probs"][rows]
            del z
            if "entropy" in fields or "log_sum_sq_probs" in fields:
                p = log_p.exp()
                if "entropy" in fields:
                    fields["entropy"][rows] = -(p * log_p).sum(-1)
                if "log_sum_sq_probs" in fields:
                    fields["log_sum_sq_probs"][rows] = torch.log(p.square_().sum(-1))
        entropy = fields.get("entropy")
        ctx.save_for_backward(hidden, weight, bias, targets, log_z, log_z if entropy is None else entropy)
        ctx.dtype, ctx.temperature = dtype, temperature
        metrics = [fields.get("log_sum_sq_probs"), fields.get("mean_logits"), top1]
        ctx.mark_non_differentiable(*(x for x in metrics if x is not None))
        return fields["log_probs"], entropy, *metrics

    @staticmethod
    def backward(ctx, grad_log_probs, grad_entropy, *_):
        from trl.trainer.utils import maybe_gather_lm_head_ctx

        hidden, weight, bias, targets, log_z, entropy = ctx.saved_tensors
        with maybe_gather_lm_head_ctx(weight, bias):  # ZeRO-3 partitions the head again after the forward
            return _backward(ctx, hidden, weight, bias, targets, log_z, entropy, grad_log_probs, grad_entropy)


def _backward(ctx, hidden, weight, bias, targets, log_z, entropy, grad_log_probs, grad_entropy):
    """The gradients of TokenLogProbs.forward's inputs, the logits recomputed one row chunk at a time."""
    dtype, temperature = ctx.dtype, ctx.temperature
    needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
    w = weight.to(dtype)
    n, vocab = hidden.shape[0], weight.shape[0]
    grad_hidden = torch.empty_like(hidden) if needs_hidden else None
    grad_weight = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if needs_weight else None
    grad_bias = torch.zeros(vocab, device=weight.device, dtype=torch.float32) if needs_bias else None
    step = rows_per_chunk(vocab)
    for start in range(0, n, step):
        rows = slice(start, min(start + step, n))
        z = _logits(hidden[rows], w, bias, dtype, temperature)
        factor = -grad_log_probs[rows].float().unsqueeze(-1) if grad_log_probs is not None else 0.0
        if grad_entropy is not None:  # d H / dz_j = -p_j (log p_j + H)
            log_p = z - log_z[rows].unsqueeze(-1)
            factor = (
                log_p.add_(entropy[rows].unsqueeze(-1)).mul_(grad_entropy[rows].float().unsqueeze(-1)).neg_() + factor
            )
        grad = torch.softmax(z, -1).mul_(factor)  # d log p_t / dz_j = 1[j = t] - p_j: the -p_j part
        del z
        if grad_log_probs is not None:
            grad.scatter_add_(-1, targets[rows].unsqueeze(-1), grad_log_probs[rows].float().unsqueeze(-1))
        if temperature != 1.0:
            grad.div_(temperature)
        grad = grad.to(dtype)
        if grad_hidden is not None:
            grad_hidden[rows] = (grad @ w).to(hidden.dtype)
        if grad_weight is not None:
            grad_weight.addmm_(grad.t().float(), hidden[rows].float())
        if grad_bias is not None:
            grad_bias += grad.sum(0, dtype=torch.float32)
    return (
        grad_hidden,
        grad_weight.to(weight.dtype) if grad_weight is not None else None,
        grad_bias.to(bias.dtype) if grad_bias is not None else None,
        None,
        None,
        None,
    )


def _logits(hidden, w, bias, dtype, temperature: float):
    z = hidden.to(dtype) @ w.t()
    if bias is not None:
        z = z + bias.to(dtype)
    z = z.float()
    return z.div_(temperature) if temperature != 1.0 else z
