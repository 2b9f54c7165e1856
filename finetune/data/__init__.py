"""Rows -> template -> token ids with a loss mask -> train/eval datasets, with exact row accounting.

The loss mask is built here, not by trl: the prompt is -100, the completion (ending in EOS) is trained. Padding
is masked later by the collator from sequence lengths, never by comparing token ids, so padding with EOS (GPT-Neo
and GPT-J have no pad token) cannot erase the EOS label the model needs to learn to stop.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from finetune.data.sources import read_rows
from finetune.data.templates import Template
from finetune.errors import DataError

IGNORE_INDEX = -100


@dataclass
class Sample:
    """One tokenized row; `line` points back at the source for error messages."""

    input_ids: list[int]
    labels: list[int]
    line: int | str


@dataclass
class PreparedData:
    train: list[Sample]
    eval: list[Sample]
    eval_rows: list[dict]
    accounting: dict = field(default_factory=dict)

    def as_datasets(self):
        """Hugging Face datasets with exactly the columns the trainer consumes."""
        from datasets import Dataset

        def to_dataset(samples: list[Sample]):
            return Dataset.from_dict({"input_ids": [s.input_ids for s in samples], "labels": [s.labels for s in samples]})

        return to_dataset(self.train), (to_dataset(self.eval) if self.eval else None)


def render(tokenizer, template: Template, conversation: list[dict], add_generation_prompt: bool = False) -> str:
    """Text of a conversation, through the tokenizer's own chat-template machinery (what inference uses)."""
    return tokenizer.apply_chat_template(
        conversation, chat_template=template.chat_template, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def prompt_text(tokenizer, template: Template, row: dict) -> str:
    """The prompt of a row: every message but the last, ready for generation."""
    return render(tokenizer, template, template.conversation(row)[:-1], add_generation_prompt=True)


def tokenize(tokenizer, template: Template, row: dict) -> Sample:
    """Prompt ids masked, completion ids trained; the completion must end with EOS."""
    conversation = template.conversation(row)
    prompt = render(tokenizer, template, conversation[:-1], add_generation_prompt=True)
    full = render(tokenizer, template, conversation)
    where = f"row {row.get('_line')}"
    if not full.startswith(prompt):
        raise DataError(f"template {template.path}: rendering the whole conversation does not start with the prompt ({where})")
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(full[len(prompt) :], add_special_tokens=False)["input_ids"]
    if not completion_ids or completion_ids[-1] != tokenizer.eos_token_id:
        raise DataError(f"template {template.path}: the trained part of {where} does not end with EOS; end it with {{{{ eos_token }}}}")
    return Sample(prompt_ids + completion_ids, [IGNORE_INDEX] * len(prompt_ids) + completion_ids, row.get("_line"))


def prepare(data_cfg, tokenizer, template: Template, seed: int) -> PreparedData:
    """Read, split, tokenize and length-check the data named by `data_cfg` (conf/data)."""
    rows = read_rows(data_cfg.path, template.required, template.optional)
    if data_cfg.eval_path:
        train_rows, eval_rows = rows, read_rows(data_cfg.eval_path, template.required, template.optional)
    else:
        train_rows, eval_rows = _split(rows, data_cfg.eval_fraction, seed)
    train, dropped_train = _tokenize_all(tokenizer, template, train_rows, data_cfg, data_cfg.path)
    evals, dropped_eval = _tokenize_all(tokenizer, template, eval_rows, data_cfg, data_cfg.eval_path or data_cfg.path)
    dropped = dropped_train + dropped_eval
    total = len(train_rows) + len(eval_rows)
    if total and dropped / total > data_cfg.max_dropped_fraction:
        raise DataError(
            f"{dropped} of {total} rows ({dropped / total:.1%}) are longer than data.max_length={data_cfg.max_length} tokens, "
            f"above data.max_dropped_fraction={data_cfg.max_dropped_fraction}; raise data.max_length or the fraction"
        )
    if not train:
        raise DataError(f"{data_cfg.path}: no training rows left after the split and length checks")
    accounting = {
        "rows_read": len(rows) + (len(eval_rows) if data_cfg.eval_path else 0),
        "train_rows": len(train),
        "eval_rows": len(evals),
        "dropped_overlength": dropped,
        "train_tokens": sum(len(s.input_ids) for s in train),
        "train_trained_tokens": sum(sum(1 for t in s.labels if t != IGNORE_INDEX) for s in train),
        "max_sample_tokens": max(len(s.input_ids) for s in train + evals),
    }
    kept_eval_lines = {s.line for s in evals}
    return PreparedData(train, evals, [r for r in eval_rows if r["_line"] in kept_eval_lines], accounting)


def _split(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Seeded hold-out: the same rows are held out on every run with the same seed."""
    if fraction <= 0:
        return rows, []
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(fraction * len(rows)))
    held = set(order[:n_eval])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def _tokenize_all(tokenizer, template: Template, rows: list[dict], data_cfg, path) -> tuple[list[Sample], int]:
    samples, too_long = [], []
    for row in rows:
        sample = tokenize(tokenizer, template, row)
        if len(sample.input_ids) > data_cfg.max_length:
            too_long.append(f"{path}:{sample.line} ({len(sample.input_ids)} tokens)")
        else:
            samples.append(sample)
    if too_long and data_cfg.overlength == "error":
        raise DataError(
            f"{len(too_long)} row(s) longer than data.max_length={data_cfg.max_length}: "
            + ", ".join(too_long[:10])
            + ("" if len(too_long) <= 10 else ", ...")
            + "; raise data.max_length or set data.overlength=drop"
        )
    return samples, len(too_long)
