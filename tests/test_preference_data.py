"""Preference data (finetune.data.preference) with the project's real tiny tokenizer: the token ids must be SFT's,
every bad row must be named by file:line before any model loads, and the bundled demo pairs must load clean."""

from __future__ import annotations

import json
import re

import pytest
from omegaconf import OmegaConf

from finetune.config.compose import DEMO_DATA_DIR
from finetune.data import templates
from finetune.data.preference import (
    PreferencePair,
    describe_preferences,
    fingerprint_rows,
    prepare_preferences,
)
from finetune.data.tokenize import prompt_text, tokenize
from finetune.errors import ConfigError, DataError
from finetune.models import fingerprint, tiny

DEMO = DEMO_DATA_DIR / "legal_medical_prefs.jsonl"
DEMO_HELDOUT = DEMO_DATA_DIR / "legal_medical_prefs_heldout.jsonl"
LONG = "The tenant shall keep the premises in good repair and condition throughout the term. " * 6


@pytest.fixture(scope="module")
def tokenizer():
    """The tiny bases' own tokenizer (tiny.build trains exactly this one), without building three models."""
    return tiny.train_tokenizer("neo", tiny._corpus_texts(tiny.DEFAULT_CORPUS), tiny.DEMO_VOCAB_SIZE, 512)


def cfg(path, **overrides):
    data = {
        "path": str(path),
        "template": "alpaca",
        "columns": {},
        "hub_config": None,
        "split": "train",
        "revision": None,
        "eval_path": None,
        "eval_split": None,
        "eval_fraction": 0.0,
        "max_length": 384,
        "overlength": "drop",
        "max_dropped_fraction": 0.01,
        "train_on_inputs": False,
        "packing": "auto",
        "skip_invalid": False,
        "max_row_bytes": 8 * 2**20,
    }
    return OmegaConf.create(data | overrides)


def write(tmp_path, rows, name="prefs.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def prepare(tokenizer, tmp_path, rows, template="alpaca", kind="paired", seed=0, **overrides):
    return prepare_preferences(cfg(write(tmp_path, rows), **overrides), tokenizer, templates.load(template), seed, kind)


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


PROMPT = [{"role": "system", "content": "You are careful."}, user("Is a promise enough?"), bot("Often."), user("Why?")]
CASES = {
    "alpaca fields": (
        "alpaca",
        {"instruction": "Define consideration.", "input": "A contract.", "chosen": "Value given.", "rejected": "None."},
        lambda answer: {"instruction": "Define consideration.", "input": "A contract.", "output": answer},
    ),
    "alpaca prompt": (
        "alpaca",
        {"prompt": "Define consideration.", "chosen": "Value given.", "rejected": "Nothing at all."},
        lambda answer: {"instruction": "Define consideration.", "output": answer},
    ),
    "dolly fields": (
        "dolly",
        {"instruction": "Summarise.", "context": "The court held.", "chosen": "It held.", "rejected": "No idea."},
        lambda answer: {"instruction": "Summarise.", "context": "The court held.", "response": answer},
    ),
    "prompt_completion": (
        "prompt_completion",
        {"prompt": "Q: What is a tort?\nA:", "chosen": " A civil wrong.", "rejected": " A cake."},
        lambda answer: {"prompt": "Q: What is a tort?\nA:", "completion": answer},
    ),
    "chatml explicit prompt, reply only": (
        "chatml",
        {"prompt": PROMPT, "chosen": [bot("It is exchanged.")], "rejected": [bot("Always, trust me.")]},
        lambda answer: {"messages": [*PROMPT, bot(answer)]},
    ),
    "chatml explicit prompt, full conversation": (
        "chatml",
        {"prompt": PROMPT, "chosen": [*PROMPT, bot("It is exchanged.")], "rejected": [*PROMPT, bot("Always.")]},
        lambda answer: {"messages": [*PROMPT, bot(answer)]},
    ),
    "sharegpt HH implicit prompt": (
        "sharegpt",
        {"chosen": [*PROMPT, bot("It is exchanged.")], "rejected": [*PROMPT, bot("Always.")]},
        lambda answer: {
            "conversations": [
                {"from": {"user": "human", "assistant": "gpt"}.get(m["role"], m["role"]), "value": m["content"]}
                for m in [*PROMPT, bot(answer)]
            ]
        },
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_prompt_plus_completion_is_the_sft_sample(tokenizer, tmp_path, case):
    name, row, sft_row = CASES[case]
    template = templates.load(name)
    path = write(tmp_path, [row])
    data = prepare_preferences(cfg(path, eval_path=str(path)), tokenizer, template, 0, "paired")
    assert data.eval == data.train and len(data.eval_rows) == 1
    [pair] = data.train
    assert isinstance(pair, PreferencePair) and pair.where.endswith("prefs.jsonl:1")
    chosen, rejected = (v[-1]["content"] if isinstance(v, list) else v for v in (row["chosen"], row["rejected"]))
    for answer, ids in ((chosen, pair.chosen_ids), (rejected, pair.rejected_ids)):
        sample = tokenize(tokenizer, template, {**sft_row(answer), "_where": "x:1"})
        assert pair.prompt_ids + ids == sample.input_ids
        assert pair.prompt_ids == sample.input_ids[: sample.final_response_start]
        assert ids[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(ids[:-1]).strip() == answer.strip()
    assert prompt_text(tokenizer, template, data.eval_rows[0]) == tokenizer.decode(pair.prompt_ids)


def test_held_out_rows_render_the_pairs_prompt(tokenizer, tmp_path):
    rows = [{**CASES["alpaca prompt"][1], "prompt": f"Question {i}?"} for i in range(10)]
    data = prepare(tokenizer, tmp_path, rows, eval_fraction=0.2)
    assert len(data.eval) == len(data.eval_rows) == 2
    for pair, row in zip(data.eval, data.eval_rows):
        assert prompt_text(tokenizer, templates.load("alpaca"), row) == tokenizer.decode(pair.prompt_ids)


def test_kto_rows_and_unpairing(tokenizer, tmp_path):
    kto = [
        {"prompt": "Dose?", "completion": "Ask your pharmacist.", "label": True},
        {"prompt": [user("Dose?")], "completion": [bot("Take 2000 mg, no doctor needed.")], "label": False},
    ]
    pairs = [{"prompt": f"Question {i}?", "chosen": "See a doctor.", "rejected": "Take 2000 mg."} for i in range(16)]
    data = prepare(tokenizer, tmp_path, kto + pairs, kind="unpaired", seed=3)
    assert data.kind == "unpaired" and data.accounting["kind"] == "unpaired"
    assert data.accounting["desirable"] == data.accounting["undesirable"] == 17
    assert data.accounting["train_rows"] == 18 and data.accounting["train_samples"] == 34
    assert {s.label for s in data.train[:8]} == {True, False}  # seeded shuffle: no one-label first batch
    again = prepare(tokenizer, tmp_path, kto + pairs, kind="unpaired", seed=3)
    assert [(s.where, s.label) for s in again.train] == [(s.where, s.label) for s in data.train]
    first = next(s for s in data.train if s.where.endswith(":1"))
    assert tokenizer.decode(first.completion_ids) == "Ask your pharmacist." + tokenizer.eos_token
    train, evals = data.as_datasets()
    assert train.column_names == ["prompt_ids", "completion_ids", "label"] and evals is None
    assert train.features["label"].dtype == "bool"
    with pytest.raises(DataError, match=r"prefs\.jsonl:1: .*objective=kto"):
        prepare(tokenizer, tmp_path, kto + pairs, kind="paired")


BAD = [
    ("missing_field", {"prompt": "Q?", "chosen": "A."}),
    ("wrong_type", {"prompt": "Q?", "chosen": 3, "rejected": "B."}),
    ("empty_completion", {"prompt": "Q?", "chosen": "A.", "rejected": "   "}),
    ("empty_field", {"prompt": " ", "chosen": "A.", "rejected": "B."}),
    ("identical_pair", {"prompt": "Q?", "chosen": "Same.", "rejected": "Same. "}),
    ("prompt_mismatch", {"chosen": [user("Q?"), bot("A.")], "rejected": [user("Other Q?"), bot("B.")]}),
    ("bad_conversation", {"chosen": [user("Q?"), bot("A."), user("More?")], "rejected": [user("Q?"), bot("B.")]}),
    ("bad_label", {"prompt": "Q?", "completion": "A.", "label": "yes"}),
]


def test_every_bad_row_is_listed_by_file_and_line_then_skip_invalid_counts_them(tokenizer, tmp_path):
    good = [{"prompt": f"Question {i}?", "chosen": "Careful.", "rejected": "Reckless."} for i in range(12)]
    rows = good[:2] + [row for _, row in BAD] + good[2:]
    with pytest.raises(DataError) as caught:
        prepare(tokenizer, tmp_path, rows, template="chatml", kind="unpaired")
    message = str(caught.value)
    assert message.startswith(f"{len(BAD)} bad preference row(s):")
    for line, (reason, _) in enumerate(BAD, start=3):
        assert re.search(rf"^  \S*prefs\.jsonl:{line}: \S", message, re.M), (reason, message)

    data = prepare(tokenizer, tmp_path, rows, template="chatml", kind="unpaired", skip_invalid=True,
                   max_dropped_fraction=1.0, eval_fraction=0.25)  # fmt: skip
    a = data.accounting
    assert a["rows_rejected"] == {reason: 1 for reason, _ in BAD}
    assert [n.where.rsplit(":", 1)[1] for n in data.not_kept] == [str(i) for i in range(3, 3 + len(BAD))]
    assert a["rows_read"] == len(rows) == a["train_rows"] + a["eval_rows"] + len(data.not_kept)
    assert a["eval_rows"] == 3 and a["train_samples"] == 2 * a["train_rows"]
    assert any("not kept (" in line for line in describe_preferences(data))


def test_truncate_prompt_left_keeps_completions_whole(tokenizer, tmp_path):
    rows = [
        {"instruction": LONG, "input": "", "chosen": "Keep it in repair.", "rejected": "Ignore the clause, trust me."},
        {"instruction": "Short?", "input": "", "chosen": LONG * 4, "rejected": "No."},
        {"instruction": "Fine?", "input": "", "chosen": "Yes.", "rejected": "No."},
    ]
    whole = prepare(tokenizer, tmp_path, rows, max_length=1024)
    data = prepare(tokenizer, tmp_path, rows, overlength="truncate_prompt_left", max_length=96,
                   max_dropped_fraction=1.0)  # fmt: skip
    kept, full = data.train[0], whole.train[0]
    assert (kept.chosen_ids, kept.rejected_ids) == (full.chosen_ids, full.rejected_ids)
    assert kept.prompt_ids == full.prompt_ids[-len(kept.prompt_ids) :]
    assert len(kept.prompt_ids) + max(len(kept.chosen_ids), len(kept.rejected_ids)) == 96
    assert data.accounting["rows_truncated"] == 1 and data.accounting["rows_dropped"] == {"response_too_long": 1}
    assert data.train[1] == whole.train[2]

    dropped = prepare(tokenizer, tmp_path, rows, max_length=96, max_dropped_fraction=1.0)
    assert dropped.accounting["rows_dropped"] == {"overlength": 2} and len(dropped.train) == 1
    with pytest.raises(DataError, match=r"prefs\.jsonl:1: .* > data\.max_length=96"):
        prepare(tokenizer, tmp_path, rows, max_length=96, overlength="error", max_dropped_fraction=1.0)
    with pytest.raises(ConfigError, match="data.overlength=chunk"):
        prepare(tokenizer, tmp_path, rows, overlength="chunk")


def test_a_template_with_no_prompt_is_a_config_error(tokenizer, tmp_path):
    with pytest.raises(ConfigError, match="data.template .*completion.yaml"):
        prepare(tokenizer, tmp_path, [{"prompt": "Q?", "chosen": "A.", "rejected": "B."}], template="completion")


def test_paired_datasets_have_exactly_the_trainer_columns(tokenizer, tmp_path):
    rows = [{"prompt": f"Q{i}?", "chosen": "Careful.", "rejected": "Reckless."} for i in range(8)]
    data = prepare(tokenizer, tmp_path, rows, eval_fraction=0.25)
    train, evals = data.as_datasets()
    assert train.column_names == evals.column_names == ["prompt_ids", "chosen_ids", "rejected_ids"]
    assert (len(train), len(evals)) == (6, 2) and data.packed is None
    assert train[0]["prompt_ids"] == data.train[0].prompt_ids
    assert data.accounting["batching"] == "padded batches (preference data is never packed)"


def test_bundled_demo_pairs_load_clean_with_alpaca(tokenizer):
    data_cfg = cfg(DEMO, eval_path=str(DEMO_HELDOUT))
    data = prepare_preferences(data_cfg, tokenizer, templates.load("alpaca"), 0, "paired")
    a = data.accounting
    assert a["rows_rejected"] == a["rows_dropped"] == {} and not data.not_kept
    assert (a["pairs"], a["eval_pairs"], len(data.eval_rows)) == (288, 32, 32)
    assert all(p.chosen_ids != p.rejected_ids for p in data.train + data.eval)
    rows = [json.loads(line) for path in (DEMO, DEMO_HELDOUT) for line in path.read_text().splitlines()]
    assert all(r["chosen"].strip() != r["rejected"].strip() for r in rows)
    assert len({r["rejected"] for r in rows}) > 100  # many rejection styles, not one fixed string
    heldout_qa = {json.loads(line)["instruction"] for line in (DEMO_DATA_DIR / "legal_medical_qa_heldout.jsonl").open()}
    assert {json.loads(line)["instruction"] for line in DEMO_HELDOUT.open()} == heldout_qa

    unpaired = prepare_preferences(data_cfg, tokenizer, templates.load("alpaca"), 0, "unpaired")
    paired_hash = fingerprint.dataset(fingerprint_rows(data), False)
    assert paired_hash == fingerprint.dataset(data.train + data.eval, False)
    assert paired_hash != fingerprint.dataset(fingerprint_rows(unpaired), False)
