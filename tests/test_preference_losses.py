"""finetune.train.preference_trainers: one loss from each trainer (its own collator, dataloader and compute_loss, on
our pre-tokenized rows) equals the paper's formula computed here independently: each sequence run alone, unpadded,
log-probs summed (or averaged) over completion tokens only, EOS included. Tiny GPT-Neo (window smaller than the
sequences, the project's sdpa attention), NeoX and GPT-J; rows of different lengths, so trl pads."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from finetune.models import lm_head, neo_attention, tiny
from finetune.train import preference_trainers as pt

EOS = 0
VOCAB = 128
WINDOW = 8
# (prompt, chosen, rejected) lengths: completions end with EOS; prompt + completion up to 21 > WINDOW
SHAPES = [(5, 4, 6), (9, 7, 3), (3, 2, 5), (12, 6, 9)]
BETA = 0.5


def _rows(low: int) -> list[tuple[list[int], list[int], list[int]]]:
    generator = torch.Generator().manual_seed(7)

    def ids(n, eos=False):
        out = torch.randint(low, VOCAB, (n,), generator=generator).tolist()
        return out[:-1] + [EOS] if eos else out

    return [(ids(p), ids(c, True), ids(r, True)) for p, c, r in SHAPES]


def _tokenizer(arch: str):
    tok = tiny.train_tokenizer(arch, ["the quick brown fox jumps over the lazy dog"], 300, 64)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # as finetune.models.load.load_tokenizer does
    assert tok.eos_token_id == EOS
    return tok


def _base(arch: str, tok):
    from transformers import AutoModelForCausalLM

    ids = {"bos_token_id": EOS, "eos_token_id": EOS, "pad_token_id": tok.pad_token_id}
    config = tiny.model_config(arch, VOCAB, hidden=32, layers=2, heads=2, positions=64, window=WINDOW, **ids)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    neo_attention.enable(model)  # GPT-Neo trains with the project's attention (a no-op for the others)
    return model


def _lora_config():
    from peft import LoraConfig

    # B initialized non-zero: the policy differs from the adapter-disabled model from the start
    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", init_lora_weights=False)


def _lora(arch: str, tok):
    from peft import get_peft_model

    return get_peft_model(_base(arch, tok), _lora_config())


def _trainer(name: str, model, tok, dataset, tmp_path, **method):
    objective = pt.OBJECTIVES[name]
    args = objective.build_config(
        output_dir=str(tmp_path),
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        per_device_train_batch_size=len(dataset),
        report_to=[],
        save_strategy="no",
        max_length=64,
        beta=BETA,
        **method,
    )
    trainer = objective.trainer_class()(model=model, args=args, train_dataset=dataset, processing_class=tok)
    for m in (trainer.model, getattr(trainer, "ref_model", None)):
        if m is not None and objective.name in ("dpo", "kto"):
            assert lm_head.compact_everywhere(m)  # as the guards will: the fused head must give what trl reads
    return trainer


def _loss(trainer):
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = [p.grad for n, p in trainer.model.named_parameters() if p.requires_grad and "default" in n]
    assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    return loss.detach(), batch


def _perturb(model) -> None:
    """Move the trained ("default") adapter away from where it started, as training steps would."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B.default" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=generator))


def _completion_logps(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """Per-token log-probs of the completion given the prompt: one sequence, no padding, the plain forward."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].float()
    per_token = logits.log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
    return per_token[len(prompt) - 1 :]


def _paired(model, rows):
    """Summed and mean completion log-probs of chosen and rejected, one pair per row."""
    lp = [(_completion_logps(model, p, c), _completion_logps(model, p, r)) for p, c, r in rows]
    return {
        "sum_c": torch.stack([c.sum() for c, _ in lp]),
        "sum_r": torch.stack([r.sum() for _, r in lp]),
        "mean_c": torch.stack([c.mean() for c, _ in lp]),
        "mean_r": torch.stack([r.mean() for _, r in lp]),
        "nll_c": -torch.cat([c for c, _ in lp]).mean(),  # token mean over every chosen completion token
    }


def _close(ours, expected):
    torch.testing.assert_close(ours, expected.to(ours.dtype), rtol=1e-5, atol=1e-6)


def _paired_dataset(rows):
    from datasets import Dataset

    return Dataset.from_dict({c: [list(x) for x in col] for c, col in zip(pt.PAIRED_COLUMNS, zip(*rows))})


ARCHS = ["neo", "neox", "gptj"]


@pytest.mark.parametrize("arch", ARCHS)
def test_dpo_loss_is_the_paper_formula(arch, tmp_path):
    tok = _tokenizer(arch)
    rows = _rows(tok.pad_token_id + 1)
    model = _lora(arch, tok)
    trainer = _trainer("dpo", model, tok, _paired_dataset(rows), tmp_path)
    assert "ref" in model.peft_config  # a PeftModel: trl's reference is a copy of the adapter as it was given
    ref = _paired(model, rows)
    _perturb(model)
    policy = _paired(model, rows)
    loss, _ = _loss(trainer)
    logits = BETA * ((policy["sum_c"] - ref["sum_c"]) - (policy["sum_r"] - ref["sum_r"]))
    _close(loss, -F.logsigmoid(logits).mean())


def test_dpo_with_fresh_lora_takes_the_adapter_disabled_model_as_reference(tmp_path):
    tok = _tokenizer("neo")
    rows = _rows(tok.pad_token_id + 1)
    base = _base("neo", tok)
    ref = _paired(base, rows)
    trainer = pt.OBJECTIVES["dpo"].trainer_class()(
        model=base,
        args=pt.OBJECTIVES["dpo"].build_config(
            output_dir=str(tmp_path),
            use_cpu=True,
            bf16=False,
            gradient_checkpointing=False,
            per_device_train_batch_size=4,
            report_to=[],
            max_length=64,
            beta=BETA,
        ),
        train_dataset=_paired_dataset(rows),
        processing_class=tok,
        peft_config=_lora_config(),
    )
    lm_head.compact_everywhere(trainer.model)
    policy = _paired(trainer.model, rows)
    with trainer.model.disable_adapter():
        torch.testing.assert_close(_paired(trainer.model, rows)["sum_c"], ref["sum_c"])
    loss, _ = _loss(trainer)
    logits = BETA * ((policy["sum_c"] - ref["sum_c"]) - (policy["sum_r"] - ref["sum_r"]))
    _close(loss, -F.logsigmoid(logits).mean())


@pytest.mark.parametrize("arch", ARCHS)
def test_orpo_loss_is_the_paper_formula_with_a_completion_only_nll(arch, tmp_path):
    tok = _tokenizer(arch)
    rows = _rows(tok.pad_token_id + 1)
    model = _lora(arch, tok)
    trainer = _trainer("orpo", model, tok, _paired_dataset(rows), tmp_path)
    policy = _paired(model, rows)
    loss, batch = _loss(trainer)

    c, r = policy["mean_c"].double(), policy["mean_r"].double()  # log p̄ = mean completion log-prob
    log_odds = (c - r) - (torch.log1p(-c.exp()) - torch.log1p(-r.exp()))
    odds_term = BETA * F.logsigmoid(log_odds).mean()
    _close(loss, policy["nll_c"] - odds_term)

    # with trl's stock NLL (prompt + completion) the same comparison fails: the override is what makes it hold
    stock = -torch.cat([_full_nll_terms(model, p + ch) for p, ch, _ in rows]).mean()
    assert not torch.allclose(loss, (stock - odds_term).to(loss.dtype), rtol=1e-5, atol=1e-6)
    _assert_no_bos(batch, rows)


def _full_nll_terms(model, ids: list[int]) -> torch.Tensor:
    t = torch.tensor([ids])
    with torch.no_grad():
        return model(input_ids=t).logits[0, :-1].float().log_softmax(-1).gather(-1, t[0, 1:, None])[:, 0]


def _assert_no_bos(batch, rows) -> None:
    """trl's ORPO/CPO tokenize_row would prepend BOS (= EOS here) to every prompt; ours are the rows' ids."""
    got = {tuple(x[m.bool()].tolist()) for x, m in zip(batch["chosen_input_ids"], batch["chosen_attention_mask"])}
    assert got == {tuple(p + c) for p, c, _ in rows}
    prompts = {tuple(x[m.bool()].tolist()) for x, m in zip(batch["prompt_input_ids"], batch["prompt_attention_mask"])}
    assert prompts == {tuple(p) for p, _, _ in rows} and all(p[0] != EOS for p in prompts)
    labels = {tuple(x[x != pt.IGNORE].tolist()) for x in batch["rejected_labels"]}
    assert labels == {tuple(r) for _, _, r in rows}  # the prompt is -100, the EOS is trained


def test_orpo_nll_ignores_the_prompt_tokens(tmp_path):
    """Scrambling only the logits that predict prompt tokens leaves ORPO's NLL term as it was (trl's stock term,
    over prompt + completion, would move) and leaves the odds-ratio term as it was too."""
    tok = _tokenizer("neox")
    rows = _rows(tok.pad_token_id + 1)
    model = _lora("neox", tok)
    trainer = _trainer("orpo", model, tok, _paired_dataset(rows), tmp_path)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    with torch.no_grad():
        before = trainer.concatenated_forward(trainer.model, batch)
    prompt_len = batch["prompt_attention_mask"].sum(-1).repeat(2)  # the forward stacks chosen rows, then rejected

    def scramble(module, args, output):
        noise = torch.zeros_like(output)
        for i, n in enumerate(prompt_len.tolist()):
            noise[i, : n - 1] = 20 * torch.randn_like(output[i, : n - 1])  # positions predicting prompt tokens 1..n-1
        return output + noise

    handle = model.get_output_embeddings().register_forward_hook(scramble)
    try:
        with torch.no_grad():
            after = trainer.concatenated_forward(trainer.model, batch)
    finally:
        handle.remove()
    assert not torch.allclose(before[2], after[2])  # the logits did change
    for i in (0, 1, 4):  # chosen logps, rejected logps, NLL
        torch.testing.assert_close(after[i], before[i], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_simpo_loss_is_the_paper_formula(arch, tmp_path):
    tok = _tokenizer(arch)
    rows = _rows(tok.pad_token_id + 1)
    model = _lora(arch, tok)
    gamma = 0.3
    trainer = _trainer("simpo", model, tok, _paired_dataset(rows), tmp_path, simpo_gamma=gamma)
    assert trainer.loss_type == "simpo" and trainer.cpo_alpha == 0.0
    policy = _paired(model, rows)
    loss, batch = _loss(trainer)
    _close(loss, -F.logsigmoid(BETA * (policy["mean_c"] - policy["mean_r"]) - gamma).mean())
    _assert_no_bos(batch, rows)


@pytest.mark.parametrize("arch", ARCHS)
def test_kto_loss_is_the_paper_formula(arch, tmp_path):
    from datasets import Dataset

    tok = _tokenizer(arch)
    pairs = _rows(tok.pad_token_id + 1)
    # unpaired rows, mixed labels, in our (already shuffled) order: chosen of pairs 0, 2; rejected of pairs 1, 3
    rows = [(p, c if i % 2 == 0 else r, i % 2 == 0) for i, (p, c, r) in enumerate(pairs)]
    dataset = Dataset.from_dict(
        {
            "prompt_ids": [p for p, _, _ in rows],
            "completion_ids": [y for _, y, _ in rows],
            "label": [b for *_, b in rows],
        }
    )
    model = _lora(arch, tok)
    trainer = _trainer("kto", model, tok, dataset, tmp_path)
    assert trainer.train_dataset["KL_completion_ids"] == [rows[i - 1][1] for i in range(len(rows))]

    def logps(prompt_completion):
        return torch.stack([_completion_logps(model, p, y).sum() for p, y in prompt_completion])

    matched = [(p, y) for p, y, _ in rows]
    mismatched = [(rows[i][0], rows[i - 1][1]) for i in range(len(rows))]  # (x_i, y_{i-1}), as trl rotates
    ref, ref_kl = logps(matched), logps(mismatched)
    _perturb(model)
    policy, policy_kl = logps(matched), logps(mismatched)
    loss, _ = _loss(trainer)

    z = (policy_kl - ref_kl).mean().clamp(min=0)  # > 0 on neo (0.16), clamped on neox and gptj: both branches
    reward = policy - ref
    desirable = torch.tensor([b for *_, b in rows])
    losses = torch.where(desirable, 1 - torch.sigmoid(BETA * (reward - z)), 1 - torch.sigmoid(BETA * (z - reward)))
    _close(loss, losses.mean())


def test_pre_tokenized_rows_are_checked_not_dropped(tmp_path):
    tok = _tokenizer("neox")
    rows = _rows(tok.pad_token_id + 1)
    model = _lora("neox", tok)
    with pytest.raises(ValueError, match="over max_length"):
        pt.OBJECTIVES["dpo"].trainer_class()(
            model=model,
            args=pt.OBJECTIVES["dpo"].build_config(
                output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to=[], max_length=16
            ),
            train_dataset=_paired_dataset(rows),
            processing_class=tok,
        )


def test_registry():
    import dataclasses

    from transformers import TrainingArguments

    assert set(pt.OBJECTIVES) == {"dpo", "orpo", "kto", "simpo"}
    assert {n for n, o in pt.OBJECTIVES.items() if o.reference_free} == {"orpo", "simpo"}
    assert pt.OBJECTIVES["kto"].kind == "unpaired" and pt.OBJECTIVES["kto"].columns == pt.UNPAIRED_COLUMNS
    simpo = pt.OBJECTIVES["simpo"]
    assert simpo.config_values(beta=2.0) == {"beta": 2.0, **pt.simpo_config_defaults()}
    assert simpo.config_values(cpo_alpha=1.0)["cpo_alpha"] == 1.0  # CPO-SimPO, when asked for
    with pytest.raises(ValueError, match="fixes loss_type"):
        simpo.config_values(loss_type="sigmoid")
    own = set(pt.OBJECTIVES["dpo"].method_fields())
    assert {"beta", "loss_type", "precompute_ref_log_probs", "max_length"} <= own
    assert not own & {f.name for f in dataclasses.fields(TrainingArguments)}
    assert "simpo_gamma" in simpo.method_fields() and simpo.config_class().__name__ == "CPOConfig"
    assert pt.OBJECTIVES["orpo"].trainer_class() is pt.ORPO and pt.ORPO.__module__ == pt.__name__
