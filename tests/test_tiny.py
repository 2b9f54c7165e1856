"""finetune.models.tiny: the offline stand-ins for the real checkpoints."""

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


def test_domain_pretraining_lowers_the_held_out_loss_and_leaves_no_dropout(tmp_path):
    """The demo base's recipe at test size: pretraining on the training file's raw text (never the held-out file)
    already lowers the loss on held-out rows; the dropout used while pretraining is not saved with the model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.config.compose import DEMO_DATA_DIR

    lines = (DEMO_DATA_DIR / "legal_medical_qa_heldout.jsonl").read_text().splitlines()
    held_out = [json.loads(line) for line in lines[:4]]

    def held_out_loss(folder):
        model, tokenizer = AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
        texts = ["\n".join(row[k] for k in tiny.TEXT_FIELDS if row[k]) for row in held_out]
        with torch.no_grad():
            losses = [
                model(input_ids=ids, labels=ids).loss.item()
                for ids in (tokenizer(t, return_tensors="pt").input_ids for t in texts)
            ]
        return sum(losses) / len(losses)

    small = {"vocab_size": 512, "hidden_size": 32, "layers": 2}
    untrained = tiny.build("neo", tmp_path / "untrained", **small)
    pretrained = tiny.build("neo", tmp_path / "pretrained", **small, domain_epochs=1)
    assert held_out_loss(pretrained) < held_out_loss(untrained) - 0.3  # measured: 6.25 -> 5.41 (seeds 0-2: 5.39-5.41)
    built = json.loads((pretrained / tiny.MARKER).read_text())
    assert built["domain_epochs"] == 1 and built["pretrain_epochs"] == 0 and built["version"] == tiny.BUILDER_VERSION
    config = json.loads((pretrained / "config.json").read_text())
    assert config["embed_dropout"] == config["attention_dropout"] == config["resid_dropout"] == 0.0


def test_ensure_rebuilds_a_cache_from_an_older_builder_and_the_planner_reads_what_it_will_build(tmp_path, monkeypatch):
    """A cached demo base from an older recipe (BUILDER_VERSION 1: 1,024 tokens, no domain pretraining) is rebuilt
    with today's, so the planner and validation read today's recipe for it, not the stale config.json; a current
    cache is kept and read as it is."""
    from types import SimpleNamespace

    from finetune.models import load

    calls = []
    monkeypatch.setattr(tiny, "build", lambda arch, out, **kwargs: calls.append(kwargs) or out)
    out = tmp_path / "tiny-gpt-neo"
    out.mkdir()
    tiny.model_config("neo", vocab_size=1024).save_pretrained(out)  # what version 1 built
    stale = tiny._fingerprint("neo", tiny.DEFAULT_CORPUS, 1024, 128, 4, 0, tiny.DEMO_PRETRAIN_EPOCHS) | {"version": 1}
    del stale["domain_epochs"]  # version 1 did not record it
    (out / tiny.MARKER).write_text(json.dumps(stale))
    model_cfg = SimpleNamespace(tiny="neo", name_or_path=str(out), revision=None, trust_remote_code=False)
    assert not tiny.is_current("neo", out)
    assert load.architecture_config(model_cfg).vocab_size == tiny.DEMO_VOCAB_SIZE == 2048
    tiny.ensure("neo", out)
    wanted = {
        "corpus": tiny.DEFAULT_CORPUS,
        "vocab_size": tiny.DEMO_VOCAB_SIZE,
        "pretrain_epochs": tiny.DEMO_PRETRAIN_EPOCHS,
        "domain_epochs": tiny.DEMO_DOMAIN_EPOCHS,
    }
    assert calls == [wanted]
    fingerprint = ("neo", tiny.DEFAULT_CORPUS, tiny.DEMO_VOCAB_SIZE, 128, 4, 0, tiny.DEMO_PRETRAIN_EPOCHS)
    current = tiny._fingerprint(*fingerprint, domain_epochs=tiny.DEMO_DOMAIN_EPOCHS)
    (out / tiny.MARKER).write_text(json.dumps(current))
    tiny.ensure("neo", out)
    assert len(calls) == 1
    assert tiny.is_current("neo", out)
    assert load.architecture_config(model_cfg).vocab_size == 1024  # current: its own config.json is read
