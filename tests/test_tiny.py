"""finetune.tiny: the offline stand-ins for the real checkpoints."""

import json

import pytest

from finetune.models import tiny


def test_padded_vocabulary_gives_the_head_more_rows_than_the_tokenizer(tmp_path):
    """Benchmarks give a tiny body the family's 50k-row head this way; the tokenizer and its ids stay as they are."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tiny.build("neox", tmp_path / "padded", vocab_size=512, hidden_size=32, layers=2, model_vocab_size=640)
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert len(tokenizer) <= 512 and model.config.vocab_size == 640
    assert model.get_output_embeddings().weight.shape == (640, 32)
    ids = tokenizer("Is a verbal contract binding?", return_tensors="pt").input_ids
    assert model(ids).logits.shape[-1] == 640
    assert json.loads((out / tiny.MARKER).read_text())["model_vocab_size"] == 640
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        tiny.build("neo", tmp_path / "too-small", vocab_size=512, hidden_size=32, layers=2, model_vocab_size=100)
    assert not (tmp_path / "too-small").exists()
