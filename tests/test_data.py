"""Loss masks, EOS, padding with EOS, the saved chat template, and bad-row reporting."""

from __future__ import annotations

import pytest
import torch

from finetune.data import IGNORE_INDEX, prompt_text, tokenize
from finetune.data import templates as data_templates
from finetune.data.sources import read_rows
from finetune.errors import DataError

ROW = {"instruction": "Define consideration.", "input": "", "output": "Something of value exchanged.", "_line": 1}


@pytest.fixture(scope="module")
def neo_tokenizer(tiny_models):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["neo"])
    assert tokenizer.pad_token is None  # GPT-Neo ships none, like the real one
    tokenizer.pad_token = tokenizer.eos_token  # the family policy (finetune.models.load_tokenizer)
    return tokenizer


def test_prompt_masked_completion_and_eos_trained(neo_tokenizer):
    template = data_templates.load("alpaca")
    sample = tokenize(neo_tokenizer, template, ROW)
    prompt_len = len(neo_tokenizer(prompt_text(neo_tokenizer, template, ROW), add_special_tokens=False).input_ids)
    assert sample.labels[:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert sample.labels[prompt_len:] == sample.input_ids[prompt_len:]
    assert sample.labels[-1] == neo_tokenizer.eos_token_id
    assert neo_tokenizer.decode(sample.input_ids[prompt_len:]).startswith("Something of value")


def test_padding_with_eos_keeps_the_real_eos_label(neo_tokenizer):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    template = data_templates.load("alpaca")
    short = tokenize(neo_tokenizer, template, ROW)
    long = tokenize(neo_tokenizer, template, {**ROW, "output": ROW["output"] * 4})
    collate = DataCollatorForLanguageModeling(pad_token_id=neo_tokenizer.pad_token_id)
    batch = collate([{"input_ids": s.input_ids, "labels": s.labels} for s in (short, long)])
    n = len(short.input_ids)
    assert batch["labels"][0, n - 1] == neo_tokenizer.eos_token_id  # trained EOS survives
    assert (batch["labels"][0, n:] == IGNORE_INDEX).all()  # padding (also EOS ids) is not trained
    assert (batch["input_ids"][0, n:] == neo_tokenizer.eos_token_id).all()


def test_saved_chat_template_reproduces_training_text(neo_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    template = data_templates.load("alpaca")
    neo_tokenizer.chat_template = template.chat_template
    neo_tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    row = {**ROW, "input": "The tenant shall keep the premises in good repair."}
    conversation = template.conversation(row)
    trained_text = neo_tokenizer.decode(tokenize(neo_tokenizer, template, row).input_ids)
    assert reloaded.apply_chat_template(conversation, tokenize=False) == trained_text
    prompt = reloaded.apply_chat_template(conversation[:-1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("### Response:\n") and "### Input:\nThe tenant shall" in prompt


def test_every_bad_row_is_reported_with_file_and_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"instruction": "q", "output": "a"}\n\n{"instruction": "q", "output": ""}\n[1]\n{"instruction": 3, "output": "a"}\n')
    with pytest.raises(DataError) as caught:
        read_rows(path, ("instruction", "output"), ("input",))
    message = str(caught.value)
    assert f"{path}:3: field 'output' is empty" in message
    assert f"{path}:4: expected a JSON object" in message
    assert f"{path}:5: field 'instruction' must be a string" in message
    assert "3 bad row(s)" in message


def test_template_without_eos_is_refused(tmp_path):
    from finetune.errors import ConfigError

    text = data_templates.resolve_path("alpaca").read_text().replace("{{ eos_token }}", "")
    (tmp_path / "noeos.yaml").write_text(text)
    with pytest.raises(ConfigError, match="never emits"):
        data_templates.load(str(tmp_path / "noeos.yaml"))
