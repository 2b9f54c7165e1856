"""What evaluation asks of a model: log-likelihood of labelled tokens, and greedy answers in batches.

Both are computed in fp32 log-softmax from the model's logits, padded on the right for scoring (positions and the
causal mask then match the unpadded sequence exactly) and on the left for generation (the prompt ends where the
answer starts); padding is excluded by the attention mask, never by token id (this family pads with EOS).
"""

from __future__ import annotations

from dataclasses import dataclass

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Scored:
    """Sum of log-probabilities of one sequence's labelled tokens, and how many there were."""

    logprob: float
    tokens: int


def label_logprobs(
    model, sequences: list[tuple[list[int], list[int]]], batch_size: int = 8, pad_id: int = 0
) -> list[Scored]:
    """For each (input_ids, labels) pair: the summed log-probability of the tokens whose label is not -100.

    Used for held-out loss (labels = the trained response tokens) and for multiple choice (labels = one option).
    Sequences are sorted by length into batches to keep padding small, and returned in input order.
    """
    import torch

    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i][0]), reverse=True)
    results: list[Scored | None] = [None] * len(sequences)
    device = _device(model)
    for start in range(0, len(order), batch_size):
        chosen = order[start : start + batch_size]
        width = max(len(sequences[i][0]) for i in chosen)
        ids = torch.full((len(chosen), width), pad_id, dtype=torch.long)
        labels = torch.full((len(chosen), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(chosen), width), dtype=torch.long)
        for row, i in enumerate(chosen):
            seq, lab = sequences[i]
            ids[row, : len(seq)] = torch.tensor(seq)
            labels[row, : len(lab)] = torch.tensor(lab)
            mask[row, : len(seq)] = 1
        with torch.no_grad():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        target = labels[:, 1:].to(device)
        keep = target != IGNORE_INDEX
        picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1) * keep
        for row, i in enumerate(chosen):
            results[i] = Scored(float(picked[row].sum()), int(keep[row].sum()))
    return results  # type: ignore[return-value]


def greedy_answers(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 8) -> list[str]:
    """Greedy completions (new text only, special tokens dropped) of rendered prompts, stopping at EOS."""
    import torch

    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]), reverse=True)
    answers: list[str] = [""] * len(prompts)
    device = _device(model)
    for start in range(0, len(order), batch_size):
        chosen = order[start : start + batch_size]
        width = max(len(encoded[i]) for i in chosen)
        ids = torch.full((len(chosen), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chosen), width), dtype=torch.long)
        for row, i in enumerate(chosen):
            ids[row, width - len(encoded[i]) :] = torch.tensor(encoded[i])
            mask[row, width - len(encoded[i]) :] = 1
        with torch.no_grad():
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=pad,
            )
        for row, i in enumerate(chosen):
            answers[i] = tokenizer.decode(out[row, width:], skip_special_tokens=True).strip()
    return answers


def _device(model):
    return next(model.parameters()).device
