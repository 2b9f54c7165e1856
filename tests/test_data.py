"""Templates, loss masks, EOS with pad == eos, the saved chat template, length policies and row accounting."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from finetune.config.schema import DataConfig
from finetune.data import templates as data_templates
from finetune.data.preview import show
from finetune.data.tokenize import (
    IGNORE_INDEX,
    _plain_backend,
    describe,
    fit_length,
    prepare,
    prompt_text,
    segments,
    tokenize,
    tokenize_many,
)
from finetune.errors import ConfigError, DataError

ROW = {
    "instruction": "Define consideration.",
    "input": "",
    "output": "Something of value exchanged.",
    "_where": "rows.jsonl:1",
}
README = Path(data_templates.TEMPLATES_DIR / "README.md").read_text()


@pytest.fixture(scope="module")
def neo_tokenizer(tiny_models):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["neo"])
    assert tokenizer.pad_token is None  # GPT-Neo ships none, like the real one
    tokenizer.pad_token = tokenizer.eos_token  # the family policy (finetune.models.load_tokenizer)
    return tokenizer


@pytest.fixture(scope="module", params=["neo", "neox", "gptj"])
def family_tokenizer(request, tiny_models):
    """Each architecture's tokenizer with the family pad policy (NeoX: <|padding|>; Neo and GPT-J: EOS)."""
    from omegaconf import OmegaConf as conf

    from finetune.models import load as models

    family = {"neo": "gpt_neo", "neox": "gpt_neox", "gptj": "gptj"}[request.param]
    pad = "<|padding|>" if request.param == "neox" else None
    return models.load_tokenizer(
        conf.create(
            {
                "name_or_path": str(tiny_models[request.param]),
                "family": family,
                "pad_token": pad,
                "revision": "main",
                "trust_remote_code": False,
            }
        )
    )


def data_config(path, **overrides) -> DataConfig:
    return OmegaConf.create(
        dataclasses.asdict(DataConfig(path=str(path), template="alpaca", **{"max_length": 256, **overrides}))
    )


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("name", data_templates.available())
def test_every_template_renders_its_example_as_documented(neo_tokenizer, name):
    template = data_templates.load(name)
    row = {**template.example, "_where": "example"}
    assert not template.check_row(row)
    sample = tokenize(neo_tokenizer, template, row)
    assert sample.labels[-1] == neo_tokenizer.eos_token_id
    assert f"```\n{show(sample, neo_tokenizer, color=False)}\n```" in README  # the docs show what the code does


@pytest.mark.parametrize("name", data_templates.available())
def test_saved_tokenizer_reproduces_training_text_byte_for_byte(neo_tokenizer, tmp_path, name):
    from transformers import AutoTokenizer

    template = data_templates.load(name)
    row = {**template.example, "_where": "example"}
    neo_tokenizer.chat_template = template.chat_template
    neo_tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    conversation = template.conversation(row)
    trained_text = neo_tokenizer.decode(tokenize(neo_tokenizer, template, row).input_ids)
    assert reloaded.apply_chat_template(conversation, tokenize=False) == trained_text
    prompt = prompt_text(neo_tokenizer, template, row)
    assert prompt and trained_text.startswith(prompt)
    last = max(i for i, m in enumerate(conversation) if m["role"] == "assistant")
    if last > 0:  # raw text (completion) has no prompt: its first words are one, checked above
        assert reloaded.apply_chat_template(conversation[:last], tokenize=False, add_generation_prompt=True) == prompt


def test_alpaca_with_and_without_input(neo_tokenizer):
    template = data_templates.load("alpaca")
    without = neo_tokenizer.decode(tokenize(neo_tokenizer, template, ROW).input_ids)
    with_input = neo_tokenizer.decode(tokenize(neo_tokenizer, template, {**ROW, "input": "A contract."}).input_ids)
    assert "### Input:" not in without and "paired with an input" not in without
    assert "### Input:\nA contract.\n\n### Response:\n" in with_input


def test_prompt_masked_completion_and_eos_trained(family_tokenizer):
    tokenizer = family_tokenizer
    template = data_templates.load("alpaca")
    sample = tokenize(tokenizer, template, ROW)
    prompt_len = len(tokenizer(prompt_text(tokenizer, template, ROW), add_special_tokens=False).input_ids)
    assert sample.labels[:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert sample.labels[prompt_len:] == sample.input_ids[prompt_len:]
    assert sample.labels[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(sample.input_ids[prompt_len:]).startswith("Something of value")


@pytest.mark.parametrize("name", ["chatml", "sharegpt"])
def test_every_assistant_turn_is_trained_and_nothing_else(family_tokenizer, name):
    neo_tokenizer = family_tokenizer
    template = data_templates.load(name)
    row = {**template.example, "_where": "example"}
    sample = tokenize(neo_tokenizer, template, row)
    trained_runs, run = [], []
    for token, label in zip(sample.input_ids, sample.labels):
        if label != IGNORE_INDEX:
            run.append(token)
        elif run:
            trained_runs.append(run)
            run = []
    trained_runs.append(run) if run else None
    assistant = [m["content"] for m in template.conversation(row) if m["role"] == "assistant"]
    assert [neo_tokenizer.decode(r) for r in trained_runs] == [a + neo_tokenizer.eos_token for a in assistant]
    untrained = neo_tokenizer.decode([t for t, label in zip(sample.input_ids, sample.labels) if label == IGNORE_INDEX])
    assert all(m["content"] in untrained for m in template.conversation(row) if m["role"] != "assistant")


def test_train_on_inputs_trains_the_prompt_too(neo_tokenizer):
    sample = tokenize(neo_tokenizer, data_templates.load("alpaca"), ROW, train_on_inputs=True)
    assert sample.labels == sample.input_ids


def test_padding_keeps_the_real_eos_label(family_tokenizer):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    neo_tokenizer = family_tokenizer

    template = data_templates.load("alpaca")
    short = tokenize(neo_tokenizer, template, ROW)
    long = tokenize(neo_tokenizer, template, {**ROW, "output": ROW["output"] * 4})
    collate = DataCollatorForLanguageModeling(pad_token_id=neo_tokenizer.pad_token_id)
    batch = collate([{"input_ids": s.input_ids, "labels": s.labels} for s in (short, long)])
    n = len(short.input_ids)
    assert batch["labels"][0, n - 1] == neo_tokenizer.eos_token_id  # trained EOS survives
    assert (batch["labels"][0, n:] == IGNORE_INDEX).all()  # padding (EOS ids on Neo and GPT-J) is not trained
    assert (batch["input_ids"][0, n:] == neo_tokenizer.pad_token_id).all()


@pytest.mark.parametrize(
    ("turns", "message"),
    [
        ([{"role": "assistant", "content": "hi"}], "expected a user message"),
        (
            [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}],
            "messages[1]: expected an assistant message",
        ),
        (
            [
                {"role": "user", "content": "a"},
                {"role": "system", "content": "b"},
                {"role": "assistant", "content": "c"},
            ],
            "messages[1]: a system message may only come first",
        ),
        (
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
            "the last message must be an assistant",
        ),
        ([{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}], "messages[1].role: unknown role 'bot'"),
        (
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": " "}],
            "messages[1].content: must be a non-empty string",
        ),
    ],
)
def test_bad_conversations_are_named_by_message_index(turns, message):
    problems = data_templates.load("chatml").check_row({"messages": turns, "_where": "x:1"})
    assert problems and problems[0].kind == "bad_conversation" and message in problems[0].text


def test_truncate_prompt_left_keeps_the_response_whole(neo_tokenizer):
    template = data_templates.load("alpaca")
    sample = tokenize(neo_tokenizer, template, {**ROW, "input": "word " * 200})
    response = sample.input_ids[sample.final_response_start :]
    (kept,), reason = fit_length(sample, 64, "truncate_prompt_left")
    assert reason is None and len(kept.input_ids) == 64 and kept.input_ids[-len(response) :] == response
    assert kept.labels[-len(response) :] == response and kept.trained == len(response)
    assert fit_length(sample, len(response) - 1, "truncate_prompt_left") == ([], "response_too_long")
    assert fit_length(sample, 64, "drop") == ([], "overlength")


def test_chunk_splits_long_text_and_never_keeps_an_untrained_piece(neo_tokenizer):
    sample = tokenize(neo_tokenizer, data_templates.load("completion"), {"text": "clause " * 300, "_where": "c:1"})
    pieces, reason = fit_length(sample, 100, "chunk")
    assert reason is None and [p.input_ids for p in pieces] == [
        sample.input_ids[i : i + 100] for i in range(0, len(sample.input_ids), 100)
    ]
    masked = sample.__class__(sample.input_ids, [IGNORE_INDEX] * len(sample.input_ids), "m:1")
    assert fit_length(masked, 100, "chunk") == ([], "no_trainable_tokens")


def test_row_accounting_adds_up_and_rejects_are_written(neo_tokenizer, tmp_path):
    rows = [{"instruction": f"q{i}", "output": f"answer {i}"} for i in range(40)]
    rows[3] = {"instruction": "q", "output": ""}  # empty response
    rows[7] = {"instruction": "q", "ouptut": "a"}  # misspelled field
    rows[9] = {"instruction": "long " * 300, "output": "a"}  # over-length
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    with path.open("a") as f:
        f.write('{"instruction": "q", "output": "a",}\n')  # trailing comma
    template = data_templates.load("alpaca")
    with pytest.raises(DataError) as caught:
        prepare(data_config(path), neo_tokenizer, template, seed=1)
    message = str(caught.value)
    assert "3 bad row(s)" in message and "data.skip_invalid=true" in message
    assert f"{path}:4: field 'output' is empty" in message
    assert (
        f"{path}:8: missing field 'output' (did you mean 'ouptut'? map it with data.columns.output=ouptut)" in message
    )
    assert f"{path}:41: invalid JSON" in message
    assert message.index(f"{path}:4:") < message.index(f"{path}:8:") < message.index(f"{path}:41:")  # file order

    data = prepare(
        data_config(path, skip_invalid=True, max_dropped_fraction=0.2, eval_fraction=0.1),
        neo_tokenizer,
        template,
        seed=1,
    )
    a = data.accounting
    assert a["rows_read"] == 41
    assert a["rows_rejected"] == {"invalid_json": 1, "empty_field": 1, "missing_field": 1} and a["rows_dropped"] == {
        "overlength": 1
    }
    assert a["rows_read"] == a["train_rows"] + a["eval_rows"] + sum(a["rows_rejected"].values()) + sum(
        a["rows_dropped"].values()
    )
    assert {n.where for n in data.not_kept} == {f"{path}:4", f"{path}:8", f"{path}:10", f"{path}:41"}
    assert all(n.raw for n in data.not_kept)


def test_too_many_dropped_rows_abort_naming_the_knobs(neo_tokenizer, tmp_path):
    rows = [{"instruction": "q " * (300 if i % 2 else 1), "output": "a"} for i in range(10)]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    with pytest.raises(
        DataError, match=r"5 of 10 rows \(50.0%\) would not train \(5 overlength\).*data.max_dropped_fraction"
    ):
        prepare(data_config(path), neo_tokenizer, data_templates.load("alpaca"), seed=1)
    with pytest.raises(DataError, match=r"5 row\(s\) longer than data.max_length=256:\n  .*rows.jsonl:2: \d+ tokens"):
        prepare(data_config(path, overlength="error"), neo_tokenizer, data_templates.load("alpaca"), seed=1)


def test_packing_is_reported_in_the_accounting(neo_tokenizer, tmp_path):
    path = write_jsonl(
        tmp_path / "rows.jsonl",
        [{"instruction": "q" * (i % 7 + 1), "output": "an answer " * (i % 5 + 1)} for i in range(50)],
    )
    data = prepare(
        data_config(path, packing=True, eval_fraction=0.0), neo_tokenizer, data_templates.load("alpaca"), seed=1
    )
    packed = data.accounting["packing"]
    assert packed["rows"] == len(data.packed) < 50 and 0.5 < packed["efficiency"] <= 1
    train, _ = data.as_datasets()
    assert train.column_names == ["input_ids", "labels", "position_ids"] and len(train) == packed["rows"]


def test_packing_auto_packs_only_when_it_saves_a_tenth_of_the_padding(neo_tokenizer, tmp_path):
    """Rows of mixed lengths pack well into rows of 512; rows of nearly one length, each over half of max_length,
    cannot share a row, so auto keeps them as padded samples. data.packing=true packs regardless."""
    alpaca = data_templates.load("alpaca")
    mixed = write_jsonl(
        tmp_path / "mixed.jsonl",
        [{"instruction": "q" * (i % 7 + 1), "output": "word " * (1 + i * 37 % 90)} for i in range(50)],
    )
    data = prepare(
        data_config(mixed, packing="auto", eval_fraction=0.0, max_length=512),
        neo_tokenizer,
        alpaca,
        seed=1,
        batch_size=4,
    )
    choice = data.accounting["batching"]
    assert (
        choice["packed"]
        and data.packed is not None
        and choice["packed_efficiency"] >= 1.1 * choice["padded_efficiency"]
    )
    assert len(data.as_datasets()[0]) == choice["packed_rows"] < 50
    assert "data: packing (data.packing=auto" in "\n".join(describe(data))

    even = write_jsonl(
        tmp_path / "even.jsonl", [{"instruction": "q", "output": "word " * (60 + i % 3)} for i in range(50)]
    )
    longest = max(
        len(s.input_ids)
        for s in prepare(data_config(even, packing=False, eval_fraction=0.0), neo_tokenizer, alpaca, seed=1).train
    )
    data = prepare(
        data_config(even, packing="auto", eval_fraction=0.0, max_length=longest),
        neo_tokenizer,
        alpaca,
        seed=1,
        batch_size=4,
    )
    choice = data.accounting["batching"]
    assert not choice["packed"] and data.packed is None and choice["packed_rows"] == 50
    assert len(data.as_datasets()[0]) == 50 and "position_ids" not in data.as_datasets()[0].column_names
    assert "data: no packing (data.packing=auto" in "\n".join(describe(data))

    forced = prepare(
        data_config(even, packing=True, eval_fraction=0.0, max_length=longest),
        neo_tokenizer,
        alpaca,
        seed=1,
        batch_size=4,
    )
    assert forced.packed is not None and forced.accounting["batching"]["setting"] is True


def test_custom_template_without_code(neo_tokenizer, tmp_path):
    custom = tmp_path / "qa.yaml"
    custom.write_text(
        "fields: {question: required, answer: required}\n"
        "messages:\n  - {role: user, content: 'Q: {{ question }}'}\n  - {role: assistant, content: '{{ answer }}'}\n"
        "chat_template: \"{% for m in messages %}{% if m.role == 'user' %}{{ m.content }}\\nA: {% else %}{{ m.content "
        '}}{{ eos_token }}{% endif %}{% endfor %}"\n'
    )
    template = data_templates.load(str(custom))
    sample = tokenize(
        neo_tokenizer, template, {"question": "What is bail?", "answer": "Release before trial.", "_where": "x:1"}
    )
    assert neo_tokenizer.decode(sample.input_ids) == "Q: What is bail?\nA: Release before trial.<|endoftext|>"
    assert neo_tokenizer.decode([t for t in sample.labels if t != IGNORE_INDEX]) == "Release before trial.<|endoftext|>"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "fields: {a: required}\nmessages: [{role: user, content: x}, {role: assistant, content: "
            "y}]\nchat_template: '{{ x }}'\n",
            "never emits",
        ),
        (
            "fields: {a: required}\nmessages: [{role: user, content: x}, {role: bot, content: y}]\nchat_template: '{{ "
            "eos_token }}'\n",
            "messages[1].role is 'bot'",
        ),
        (
            "fields: {a: required}\nmessages: [{role: user, content: x}]\nchat_template: '{{ eos_token }}'\n",
            "must have role assistant",
        ),
        (
            "conversation: {field: m, role_key: r, content_key: c, roles: {u: user}}\nchat_template: '{{ eos_token "
            "}}'\n",
            "some role to user and some to assistant",
        ),
        ("fields: {a: required}\nmesages: []\nchat_template: '{{ eos_token }}'\n", "unknown key 'mesages'"),
    ],
)
def test_broken_templates_are_refused_naming_the_key(tmp_path, text, message):
    (tmp_path / "t.yaml").write_text(text)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        data_templates.load(str(tmp_path / "t.yaml"))


# The fast path (finetune.data._ChatRenderer, _encode, templates._Field, packing.gc_paused) against the plain algorithm
# it replaced: every field rendered by Jinja, every prefix rendered by tokenizer.apply_chat_template, one tokenizer
# call per piece, best-fit packing sorted by (-length, index).

TRICKY = " {{ eos_token }} {% if x %}<|endoftext|> café 🙂\r\n\tdone  "  # Jinja-looking text, EOS text, unicode, \r\n


def _reference_conversation(template, row: dict) -> list[dict]:
    if template.conversation_spec:
        return template.conversation(row)
    values = {name: row.get(name) or "" for name in template.optional} | {name: row[name] for name in template.required}
    return [
        {
            key: data_templates._JINJA.from_string(text).render(values) if isinstance(text, str) else text
            for key, text in message.items()
        }
        for message in template.messages
    ]


def _reference_segments(tokenizer, template, conversation: list[dict]) -> list[tuple[str, bool]]:
    def render(messages, add_generation_prompt=False):
        return (
            tokenizer.apply_chat_template(
                messages,
                chat_template=template.chat_template,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
            )
            if messages
            else ""
        )

    pieces, done = [], ""
    for i, message in enumerate(conversation):
        if message["role"] == "assistant":
            prompt, upto = render(conversation[:i], add_generation_prompt=True), render(conversation[: i + 1])
            assert prompt.startswith(done) and upto.startswith(prompt)
            pieces += [(prompt[len(done) :], False), (upto[len(prompt) :], True)]
            done = upto
    assert done == render(conversation)
    return [(text, trained) for text, trained in pieces if text]


def _reference_tokenize(tokenizer, template, row: dict, train_on_inputs: bool) -> tuple[list[int], list[int], int]:
    ids, labels, final_response_start = [], [], 0
    for text, trained in _reference_segments(tokenizer, template, _reference_conversation(template, row)):
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        if trained:
            final_response_start = len(ids)
            assert piece[-1] == tokenizer.eos_token_id
        ids += piece
        labels += piece if trained or train_on_inputs else [IGNORE_INDEX] * len(piece)
    return ids, labels, final_response_start


def _variants(template) -> list[dict]:
    """The template's example, and versions of it with tricky text, fewer turns or optional fields left out."""
    example = template.example
    if template.conversation_spec:
        spec = template.conversation_spec
        turns = example[spec["field"]]
        rows = [
            example,
            {spec["field"]: turns[-2:]},
            {spec["field"]: [{**turn, spec["content_key"]: turn[spec["content_key"]] + TRICKY} for turn in turns]},
        ]
    else:
        rows = [
            example,
            {k: v + TRICKY if isinstance(v, str) and v else v for k, v in example.items()},
            {k: example[k] for k in template.required},
            {**example, **{k: "" for k in template.optional}},
        ]
    rows = [{**row, "_where": f"variants:{i + 1}"} for i, row in enumerate(rows)]
    assert not any(template.check_row(row) for row in rows)
    return rows


def _assert_matches_reference(tokenizer, template, rows: list[dict]) -> None:
    for train_on_inputs in (False, True):
        samples = tokenize_many(tokenizer, template, rows, train_on_inputs)
        assert len(samples) == len(rows)
        for row, sample in zip(rows, samples):
            ids, labels, final_response_start = _reference_tokenize(tokenizer, template, row, train_on_inputs)
            assert sample.input_ids == ids, row["_where"]
            assert sample.labels == labels, row["_where"]
            assert sample.final_response_start == final_response_start and sample.where == row["_where"]
            assert tokenize(tokenizer, template, row, train_on_inputs) == sample
    for row in rows:
        conversation = template.conversation(row)
        assert conversation == _reference_conversation(template, row)
        assert segments(tokenizer, template, conversation) == _reference_segments(tokenizer, template, conversation)


@pytest.mark.parametrize("name", data_templates.available())
def test_fast_path_gives_the_ids_and_labels_of_apply_chat_template_prefix_rendering(family_tokenizer, name):
    assert _plain_backend(family_tokenizer) is not None  # the Rust fast path is the one under test
    _assert_matches_reference(family_tokenizer, data_templates.load(name), _variants(data_templates.load(name)))


def test_chunks_tokenized_in_a_worker_thread_give_the_same_samples(neo_tokenizer, monkeypatch, tmp_path):
    """Large inputs are rendered chunk by chunk while a worker thread tokenizes: same samples, same errors."""
    import finetune.data.tokenize

    monkeypatch.setattr(finetune.data.tokenize, "_CHUNK_ROWS", 2)
    template = data_templates.load("sharegpt")
    rows = [{**row, "_where": f"chunked:{i}"} for i, row in enumerate(_variants(template) * 3)]
    _assert_matches_reference(neo_tokenizer, template, rows)
    (tmp_path / "no_eos.yaml").write_text(
        "fields: {q: required, a: required}\nmessages: [{role: user, content: '{{ q }}'}, "
        "{role: assistant, content: '{{ a }}'}]\nchat_template: \"{% for m in messages %}"
        "{{ m.content }}{% if m.content != 'x' %}{{ eos_token }}{% endif %}{% endfor %}\"\n"
    )
    rows = [{"q": "q", "a": "x" if i == 5 else "an answer", "_where": f"rows.jsonl:{i + 1}"} for i in range(7)]
    with pytest.raises(ConfigError, match=r"an assistant message of rows.jsonl:6 does not end with EOS"):
        tokenize_many(neo_tokenizer, data_templates.load(str(tmp_path / "no_eos.yaml")), rows)


def test_fast_path_matches_for_messages_transformers_converts(neo_tokenizer, tmp_path):
    """Non-string and None message values and reasoning fields: what apply_chat_template converts before rendering."""
    custom = tmp_path / "qa.yaml"
    custom.write_text(
        "fields: {question: required, answer: required, notes: optional}\n"
        "messages:\n"
        "  - {role: user, content: 'Q: {{ question }}', priority: 2, tag: null}\n"
        "  - {role: assistant, content: '{{ answer }}', thinking: '{{ notes }}'}\n"
        "chat_template: \"{% for m in messages %}{% if m.role == 'user' %}{% if m.tag is defined %}TAG {% endif %}[{{ "
        "m.priority }}] {{ m.content }}\\nA: "
        "{% else %}{% if m.reasoning_content %}({{ m.reasoning_content }}) {% endif %}{{ m.content }}{{ eos_token }}{% "
        'endif %}{% endfor %}"\n'
    )
    template = data_templates.load(str(custom))
    rows = [
        {"question": "What is bail?", "answer": "Release before trial.", "notes": "criminal law", "_where": "x:1"},
        {"question": "What is a tort?" + TRICKY, "answer": "A civil wrong.", "_where": "x:2"},
    ]
    _assert_matches_reference(neo_tokenizer, template, rows)
    assert "(criminal law) Release" in neo_tokenizer.decode(tokenize(neo_tokenizer, template, rows[0]).input_ids)


def test_fast_path_matches_when_the_backend_cannot_be_called_directly(tiny_models):
    """A backend with truncation set (transformers turns it off per call) goes through tokenizer(...) instead."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["neox"])
    tokenizer.backend_tokenizer.enable_truncation(8)
    assert _plain_backend(tokenizer) is None
    template = data_templates.load("chatml")
    _assert_matches_reference(tokenizer, template, _variants(template))


def test_templates_that_are_not_a_concatenation_or_omit_eos_are_refused(neo_tokenizer, tmp_path):
    fields = (
        "fields: {q: required, a: required}\n"
        "messages: [{role: user, content: '{{ q }}'}, {role: assistant, content: '{{ a }}'}]\n"
    )
    (tmp_path / "suffix.yaml").write_text(
        fields + 'chat_template: "{% for m in messages %}{{ m.content }}{{ eos_token if m.role == '
        "'assistant' else '' }}{% endfor %}{% if add_generation_prompt %}A: {% endif %}\"\n"
    )
    (tmp_path / "no_eos.yaml").write_text(
        fields + 'chat_template: "{% for m in messages %}{{ m.content }}{% endfor %}{# eos_token #}"\n'
    )
    row = {"q": "Q?", "a": "an answer", "_where": "rows.jsonl:3"}
    with pytest.raises(
        ConfigError, match=r"rendering messages 0..1 does not extend the text of the messages before it"
    ):
        tokenize(neo_tokenizer, data_templates.load(str(tmp_path / "suffix.yaml")), row)
    with pytest.raises(ConfigError, match=r"an assistant message of rows.jsonl:3 does not end with EOS"):
        tokenize(neo_tokenizer, data_templates.load(str(tmp_path / "no_eos.yaml")), row)


def test_pack_matches_the_reference_best_fit():
    import bisect

    from finetune.data import packing
    from finetune.data.tokenize import Sample

    lengths = [7, 3, 7, 1, 5, 3, 8, 2, 7, 4, 6, 1, 3]  # ties: equal lengths must keep their sample order
    samples = [
        Sample(list(range(100 * i, 100 * i + n)), [IGNORE_INDEX] + list(range(1, n)), f"s:{i}")
        for i, n in enumerate(lengths)
    ]
    order = sorted(range(len(samples)), key=lambda i: (-len(samples[i].input_ids), i))
    rows, free = [], []
    for i in order:
        need = len(samples[i].input_ids)
        at = bisect.bisect_left(free, (need, -1))
        if at < len(free):
            space, row = free.pop(at)
            rows[row].append(i)
            if space - need > 0:
                bisect.insort(free, (space - need, row))
        else:
            rows.append([i])
            if 10 - need > 0:
                bisect.insort(free, (10 - need, len(rows) - 1))
    expected = [
        packing.PackedRow(
            [t for i in m for t in samples[i].input_ids],
            [t for i in m for t in samples[i].labels],
            [p for i in m for p in range(lengths[i])],
            [lengths[i] for i in m],
        )
        for m in rows
    ]
    assert packing.pack(samples, 10) == expected
