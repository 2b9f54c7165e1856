"""Packing: samples in one row never see each other, and per-token losses equal the unpacked ones, per architecture."""

from __future__ import annotations

import pytest
import torch

from finetune.data import packing
from finetune.data.tokenize import IGNORE_INDEX, Sample


def _samples(lengths, vocab_size, seed=0):
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for i, n in enumerate(lengths):
        ids = torch.randint(3, vocab_size, (n,), generator=generator).tolist()
        labels = [IGNORE_INDEX] * (n // 3) + ids[n // 3 :]  # a masked prompt, a trained completion
        samples.append(Sample(ids, labels, f"row {i}"))
    return samples


def _per_token_loss(logits, labels):
    shifted = labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2).float(), shifted, reduction="none", ignore_index=IGNORE_INDEX
    )
    return loss, shifted != IGNORE_INDEX


def test_best_fit_fills_rows_and_keeps_every_sample_once():
    samples = _samples([90, 60, 40, 30, 20, 100, 10, 5, 70], vocab_size=50)
    rows = packing.pack(samples, max_length=128)
    assert all(len(r.input_ids) <= 128 for r in rows)
    assert sorted(n for r in rows for n in r.lengths) == sorted(len(s.input_ids) for s in samples)
    assert sum(len(r.input_ids) for r in rows) == sum(len(s.input_ids) for s in samples)
    assert len(rows) == 4  # 425 tokens need at least 4 rows of 128; best fit reaches that
    for r in rows:  # positions restart at every sample
        assert r.position_ids == [p for n in r.lengths for p in range(n)]
    assert packing.efficiency(rows, 128) == pytest.approx(425 / (4 * 128))


@pytest.mark.parametrize(("arch", "attn"), [("neo", "eager"), ("neox", "eager"), ("neox", "sdpa"), ("gptj", "eager")])
def test_packed_losses_equal_unpacked(tiny_models, arch, attn):
    """GPT-Neo's samples are longer than its local window (32): the window must still apply inside each sample."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models[arch], attn_implementation=attn, dtype=torch.float32)
    model.config.use_cache = False  # as in training (trl sets it too)
    samples = _samples([70, 45, 120, 33, 90, 60, 10], model.config.vocab_size)
    rows = packing.pack(samples, max_length=192)
    assert any(len(r.lengths) > 1 for r in rows)
    batch = packing.PackedCollator(pad_token_id=0)(
        [{"input_ids": r.input_ids, "labels": r.labels, "position_ids": r.position_ids} for r in rows]
    )
    assert "attention_mask" not in batch  # a 2-D mask would switch transformers' packed-sequence masks off
    with torch.no_grad():
        packed_loss, packed_mask = _per_token_loss(
            model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits, batch["labels"]
        )
        packed_tokens = packed_loss[packed_mask]
        alone_tokens = []
        by_ids = {tuple(s.input_ids): s for s in samples}
        for r in rows:
            start = 0
            for n in r.lengths:
                s = by_ids[tuple(r.input_ids[start : start + n])]
                loss, mask = _per_token_loss(
                    model(input_ids=torch.tensor([s.input_ids])).logits, torch.tensor([s.labels])
                )
                alone_tokens.append(loss[mask])
                start += n
    alone = torch.cat(alone_tokens)
    assert packed_tokens.shape == alone.shape
    assert torch.allclose(packed_tokens, alone, atol=1e-5, rtol=0), (packed_tokens - alone).abs().max()
    assert packing.verify_isolation(model, model.config.vocab_size, 192) < 1e-5


def test_isolation_probe_catches_a_leak(tiny_models):
    """With a 2-D attention mask transformers ignores restarted positions: the probe must refuse that model."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models["neox"], attn_implementation="eager", dtype=torch.float32)
    original = model.forward

    def leaky_forward(*args, **kwargs):
        kwargs["attention_mask"] = torch.ones_like(kwargs["input_ids"])
        return original(*args, **kwargs)

    model.forward = leaky_forward
    with pytest.raises(packing.IsolationError, match="see each other"):
        packing.verify_isolation(model, model.config.vocab_size, 64)
