"""Preference rows -> prompt / chosen / rejected token ids (DPO, ORPO, SimPO) or prompt / completion / label (KTO).

Every conversation is rendered and tokenized exactly as SFT does (finetune.data.tokenize.tokenize_many): the prompt
ids are the tokens before the final assistant message, a completion's ids are that message's tokens with its EOS.
So prompt_ids + chosen_ids is token for token the SFT sample of the chosen conversation, and what preference tuning
teaches is what inference renders.

Row forms, recognised per row: `prompt` + `chosen` + `rejected` (strings, or the template's own fields such as
Alpaca's instruction/input with `chosen`/`rejected` in place of the response); message lists (UltraFeedback with an
explicit `prompt`, HH-RLHF with the prompt as the shared leading messages); KTO's `prompt` + `completion` + `label`.
Row accounting is SFT's: rows_read = train_rows + eval_rows + rejected (by reason) + dropped (by reason).
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
from collections import Counter
from dataclasses import dataclass, field

from finetune.data import sources
from finetune.data.templates import _FIELD_ONLY, ROLES, Template
from finetune.data.tokenize import (
    DROP_REASONS,
    NotKept,
    _listing,
    _raw,
    _split,
    notes_and_warnings,
    refuse_not_kept,
    tokenize_many,
)
from finetune.errors import ConfigError, DataError

KINDS = ("paired", "unpaired")
LENGTH_POLICIES = ("drop", "error", "truncate_prompt_left")
BATCHING = "padded batches (preference data is never packed)"
_PAIR_FIELDS = ("chosen", "rejected")
_KTO_FIELDS = ("completion", "label")


@dataclass
class PreferencePair:
    """One kept paired row (DPO, ORPO, SimPO, ...)."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    where: str

    @property
    def input_ids(self) -> list[int]:
        """Every token of the pair, so finetune.models.fingerprint.dataset can hash it like an SFT sample."""
        return self.prompt_ids + self.chosen_ids + self.rejected_ids

    @property
    def labels(self) -> list[int]:
        """The three lengths: with input_ids they tell any two pairs apart (a fingerprint, not a loss mask)."""
        return [len(self.prompt_ids), len(self.chosen_ids), len(self.rejected_ids)]


@dataclass
class PreferenceSample:
    """One unpaired row (KTO): a completion the data calls desirable (label True) or undesirable."""

    prompt_ids: list[int]
    completion_ids: list[int]
    label: bool
    where: str

    @property
    def input_ids(self) -> list[int]:
        """See PreferencePair.input_ids."""
        return self.prompt_ids + self.completion_ids

    @property
    def labels(self) -> list[int]:
        return [len(self.prompt_ids), int(self.label)]


@dataclass
class PreparedPreferences:
    kind: str
    train: list
    eval: list
    eval_rows: list[dict]
    """Kept held-out rows in the template's row form with the chosen (or the KTO) completion as the response, for
    finetune.data.tokenize.prompt_text (sample generations). A prompt the template's fields cannot hold (a multi-turn
    prompt under Alpaca) is left out."""
    accounting: dict = field(default_factory=dict)
    not_kept: list[NotKept] = field(default_factory=list)
    packed: None = None
    notes: list[str] = field(default_factory=list)

    def as_datasets(self):
        """Hugging Face datasets with exactly the columns trl's preference trainers read as pre-tokenized data."""
        from datasets import Dataset

        def one(items):
            if self.kind == "paired":
                columns = {
                    "prompt_ids": [p.prompt_ids for p in items],
                    "chosen_ids": [p.chosen_ids for p in items],
                    "rejected_ids": [p.rejected_ids for p in items],
                }
            else:
                columns = {
                    "prompt_ids": [s.prompt_ids for s in items],
                    "completion_ids": [s.completion_ids for s in items],
                    "label": [bool(s.label) for s in items],
                }
            return Dataset.from_dict(columns)

        return one(self.train), (one(self.eval) if self.eval else None)


@dataclass
class _Row:
    """A checked row: its conversations (each ending with the assistant message to score) and their labels."""

    where: str
    raw: dict
    conversations: list[list[dict]]
    labels: list[bool]
    eval_row: dict | None


class _Bad(Exception):
    """A row that does not fit: `reason` is the accounting key, the message names the field."""

    def __init__(self, reason: str, text: str):
        super().__init__(text)
        self.reason = reason


def prepare_preferences(data_cfg, tokenizer, template: Template, seed: int, kind: str, progress=None):
    """Read, check, split, tokenize and length-fit preference rows named by `data_cfg` (the SFT `data:` group;
    packing and train_on_inputs do not apply). `kind`: paired (DPO-like) or unpaired (KTO).

    `progress(total)`: a context manager yielding `advance(n)`, told as conversations are tokenized."""
    if kind not in KINDS:
        raise ConfigError(f"preference data kind '{kind}': use one of {', '.join(KINDS)}")
    if data_cfg.overlength not in LENGTH_POLICIES:
        raise ConfigError(
            f"data.overlength={data_cfg.overlength} does not apply to preference data (a pair cannot be cut into "
            f"chunks); use one of {', '.join(LENGTH_POLICIES)}"
        )
    _check_template(template)
    columns = dict(data_cfg.columns or {})
    read, eval_read = sources.read_train_and_held_out(data_cfg, columns)
    not_kept = [NotKept(r.where, r.kind, r.reason, r.raw) for r in read.rejected + eval_read.rejected]
    held_out = bool(data_cfg.eval_path or data_cfg.eval_split)
    train_rows = _checked(read.rows, template, kind, not_kept)
    eval_rows = _checked(eval_read.rows, template, kind, not_kept)
    rows_read = len(read.rows) + len(read.rejected) + len(eval_read.rows) + len(eval_read.rejected)
    if not_kept and not data_cfg.skip_invalid:
        raise DataError(
            _listing(
                not_kept,
                "bad preference row(s)",
                "fix them, or set data.skip_invalid=true to drop them and list them in rejected_rows.jsonl",
            )
        )
    if not held_out:
        train_rows, eval_rows = _split(train_rows, data_cfg.eval_fraction, seed)

    total = sum(len(r.conversations) for r in train_rows + eval_rows)
    with progress(total) if progress else contextlib.nullcontext() as advance:
        train, kept_train, truncated = _tokenized(tokenizer, template, train_rows, kind, data_cfg, not_kept, advance)
        evals, kept_eval, truncated_eval = _tokenized(tokenizer, template, eval_rows, kind, data_cfg, not_kept, advance)
    refuse_not_kept(not_kept, rows_read, data_cfg, LENGTH_POLICIES)
    if not train:
        raise DataError(f"{data_cfg.path}: no preference rows left after checks, split and length policy")
    if kind == "unpaired":
        random.Random(seed).shuffle(train)  # trl's KTO keeps the order: unshuffled pairs give one-label batches
    accounting = _accounting(kind, rows_read, not_kept, train, evals, kept_train, kept_eval, truncated + truncated_eval)
    kept_eval_rows = [r.eval_row for r, kept in zip(eval_rows, kept_eval) if kept and r.eval_row is not None]
    return PreparedPreferences(
        kind, train, evals, kept_eval_rows, accounting, not_kept, None, read.notes + eval_read.notes
    )


def describe_preferences(data: PreparedPreferences) -> list[str]:
    """The row accounting and token statistics, as log lines (as finetune.data.tokenize.describe for SFT)."""
    a = data.accounting
    not_kept = {**a["rows_rejected"], **a["rows_dropped"]}
    why = ", ".join(f"{n} {reason}" for reason, n in not_kept.items()) or "none"
    if data.kind == "paired":
        what = f"{a['pairs']} train pairs"
    else:
        what = f"{a['train_samples']} train completions ({a['desirable']} desirable, {a['undesirable']} undesirable)"
    length = a["token_length"]
    lines = [
        f"data: {a['rows_read']} rows read = {a['train_rows']} train + {a['eval_rows']} held out + "
        f"{sum(not_kept.values())} not kept ({why})"
        + (f"; {a['rows_truncated']} prompts truncated from the left" if a["rows_truncated"] else ""),
        f"data: {what}, {a['train_tokens']:,} tokens, {a['train_trained_tokens']:,} in completions; prompt + longest "
        f"completion p50 {length['p50']}, p90 {length['p90']}, p99 {length['p99']}, max {length['max']}",
        f"data: {a['batching']}",
    ]
    return lines + notes_and_warnings(data)


def fingerprint_rows(data: PreparedPreferences) -> list:
    """What finetune.models.fingerprint.dataset(rows, packed=False) hashes: the pairs / samples themselves (their
    input_ids and labels properties)."""
    return data.train + data.eval


def _check_template(template: Template) -> None:
    """A preference row needs a prompt turn before the completion; a template without a user message has none."""
    if template.conversation_spec or any(m.get("role") == "user" for m in template.messages):
        return
    raise ConfigError(
        f"data.template {template.path}: renders no user message, so a preference row's prompt has nowhere to go; "
        "use a template with a prompt (alpaca, dolly, prompt_completion, chatml, sharegpt)"
    )


def _checked(rows: list[dict], template: Template, kind: str, not_kept: list[NotKept]) -> list[_Row]:
    good = []
    for row in rows:
        try:
            good.append(_normalized(row, template, kind))
        except _Bad as bad:
            not_kept.append(NotKept(row["_where"], bad.reason, str(bad), _raw(row)))
    return good


def _normalized(row: dict, template: Template, kind: str) -> _Row:
    """The row's conversations, or _Bad naming the first problem."""
    where = row["_where"]
    if any(name in row for name in _PAIR_FIELDS):
        for name in _PAIR_FIELDS:
            if name not in row:
                raise _Bad("missing_field", f"missing field '{name}' (a preference row has chosen and rejected)")
        chosen, rejected = row["chosen"], row["rejected"]
        _completion_types(chosen, "chosen")
        _completion_types(rejected, "rejected")
        if type(chosen) is not type(rejected):
            raise _Bad("wrong_type", "'chosen' and 'rejected' must both be strings or both be lists of messages")
        prompt, finals = _prompt_and_finals(row, template, [("chosen", chosen), ("rejected", rejected)])
        if _text(finals[0]).strip() == _text(finals[1]).strip():
            raise _Bad("identical_pair", "'chosen' and 'rejected' are the same answer: nothing to prefer")
        labels = [True, False]
    elif "completion" in row or "label" in row:
        if kind == "paired":
            raise _Bad(
                "unpaired_row",
                "a KTO row (prompt + completion + label) in paired preference data; use objective=kto for "
                "unpaired data, or give chosen and rejected",
            )
        for name in _KTO_FIELDS:
            if name not in row:
                raise _Bad("missing_field", f"missing field '{name}' (a KTO row has prompt, completion and label)")
        if not isinstance(row["label"], bool):
            raise _Bad("bad_label", f"field 'label' must be true or false, got {row['label']!r}")
        _completion_types(row["completion"], "completion")
        prompt, finals = _prompt_and_finals(row, template, [("completion", row["completion"])])
        labels = [row["label"]]
    else:
        present = ", ".join(k for k in row if not k.startswith("_"))
        raise _Bad(
            "missing_field",
            f"missing field 'chosen' and 'rejected' (or, for KTO, 'completion' and 'label'); row has: {present}",
        )
    conversations = [prompt + [final] for final in finals]
    return _Row(where, row, conversations, labels, _eval_row(row, template, prompt, finals[0]))


def _completion_types(value, name: str) -> None:
    if isinstance(value, str):
        if not value.strip():
            raise _Bad("empty_completion", f"field '{name}' is empty")
    elif not isinstance(value, list):
        raise _Bad("wrong_type", f"field '{name}' must be a string or a list of messages, got {type(value).__name__}")
    elif not value:
        raise _Bad("empty_completion", f"field '{name}' is an empty list of messages")


def _response_field(template: Template) -> str | None:
    """The row field rendered as the last assistant message (Alpaca's output), if it is one plain field."""
    if template.conversation_spec or not template.messages or template.messages[-1].get("role") != "assistant":
        return None
    match = _FIELD_ONLY.fullmatch(str(template.messages[-1].get("content", "")))
    return match.group(1) if match and match.group(1) in template.required else None


def _prompt_and_finals(row: dict, template: Template, completions: list[tuple[str, object]]):
    """(prompt messages, one final assistant message per completion): through the template's fields when the row
    has them (Alpaca's instruction/input), else from `prompt` or the message lists' shared leading turns."""
    response = _response_field(template)
    own_fields = [name for name in template.required if name != response]
    if (
        response
        and own_fields
        and all(name in row for name in own_fields)
        and all(isinstance(value, str) for _, value in completions)
    ):
        conversations = []
        for _, value in completions:
            filled = {**row, response: value}
            problems = template.check_row(filled)
            if problems:
                raise _Bad(problems[0].kind, "; ".join(p.text for p in problems))
            conversations.append(template.conversation(filled))
        return conversations[0][:-1], [c[-1] for c in conversations]
    if all(isinstance(value, str) for _, value in completions):
        prompt = _prompt(row, template)
        if not prompt:
            raise _Bad("missing_field", _missing_prompt(row, template, own_fields))
        return prompt, [{"role": "assistant", "content": value} for _, value in completions]
    lists = [(name, _messages(value, name, template)) for name, value in completions]
    prompt = _prompt(row, template)
    finals, leads = [], []
    for name, messages in lists:
        if messages[-1]["role"] != "assistant":
            raise _Bad("bad_conversation", f"{name}: the last message must be an assistant message")
        if not messages[-1]["content"].strip():
            raise _Bad("empty_completion", f"{name}[{len(messages) - 1}].content is empty")
        lead = messages[:-1]
        if prompt is not None and lead and lead != prompt:
            raise _Bad("prompt_mismatch", f"{name}: its leading messages differ from 'prompt'")
        finals.append(messages[-1])
        leads.append(lead)
    if prompt is None:
        if any(lead != leads[0] for lead in leads):
            raise _Bad(
                "prompt_mismatch",
                "'chosen' and 'rejected' differ before their last message (they must share the prompt turns)",
            )
        prompt = leads[0]
    if not prompt:
        raise _Bad("missing_field", _missing_prompt(row, template, own_fields))
    problem = _order_problem([m["role"] for m in prompt + [finals[0]]])
    if problem:
        raise _Bad("bad_conversation", problem)
    return prompt, finals


def _prompt(row: dict, template: Template) -> list[dict] | None:
    """The row's `prompt` as messages (a string is one user message); None when the row has none."""
    if "prompt" not in row:
        return None
    value = row["prompt"]
    if isinstance(value, str):
        if not value.strip():
            raise _Bad("empty_field", "field 'prompt' is empty")
        return [_with_extras({"role": "user", "content": value}, template)]
    if not isinstance(value, list):
        raise _Bad("wrong_type", f"field 'prompt' must be a string or a list of messages, got {type(value).__name__}")
    messages = _messages(value, "prompt", template)
    problem = _order_problem([m["role"] for m in messages] + ["assistant"])
    if problem:
        raise _Bad("bad_conversation", f"prompt: {problem}")
    return messages


def _messages(value: list, name: str, template: Template) -> list[dict]:
    """{role, content} messages (or the template's own keys and role names, ShareGPT's from/value)."""
    spec = template.conversation_spec
    messages = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise _Bad("bad_conversation", f"{name}[{i}]: expected an object with role and content")
        if "role" in item:
            role, content = item["role"], item.get("content")
        elif spec and spec["role_key"] in item:
            role, content = (
                spec["roles"].get(item[spec["role_key"]], item[spec["role_key"]]),
                item.get(spec["content_key"]),
            )
        else:
            raise _Bad("bad_conversation", f"{name}[{i}]: missing 'role'")
        if role not in ROLES:
            raise _Bad("bad_conversation", f"{name}[{i}].role: unknown role {role!r}; use one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise _Bad("wrong_type", f"{name}[{i}].content must be a string, got {type(content).__name__}")
        if not content.strip() and not (role == "assistant" and i == len(value) - 1):
            raise _Bad("bad_conversation", f"{name}[{i}].content is empty")
        messages.append(_with_extras({"role": role, "content": content}, template))
    return messages


def _with_extras(message: dict, template: Template) -> dict:
    """The extra keys the template's own messages of that role carry (Alpaca's `input`), empty: chat templates
    read them."""
    for own in template.messages:
        if own.get("role") == message["role"]:
            return {**{k: "" for k in own if k not in ("role", "content")}, **message}
    return message


def _order_problem(roles: list[str]) -> str | None:
    """System first only, then user and assistant alternating from a user turn (what the chat templates expect)."""
    body = roles[1:] if roles and roles[0] == "system" else roles
    if "system" in body:
        return "a system message may only come first"
    for i, role in enumerate(body):
        if role != ("user" if i % 2 == 0 else "assistant"):
            return f"message {i + len(roles) - len(body)}: expected user and assistant to alternate, user first"
    return None


def _missing_prompt(row: dict, template: Template, own_fields: list[str]) -> str:
    present = ", ".join(k for k in row if not k.startswith("_"))
    fields = " + ".join(own_fields) if own_fields else "a prompt"
    return f"missing field 'prompt' (or the template's {fields}); row has: {present}"


def _text(message: dict) -> str:
    return message["content"]


def _eval_row(row: dict, template: Template, prompt: list[dict], final: dict) -> dict | None:
    """The row as template.conversation reads it, answered with `final`: what prompt_text renders for generation."""
    where = {"_where": row["_where"]}
    spec = template.conversation_spec
    if spec:
        names = {}
        for data_role, role in spec["roles"].items():
            names.setdefault(role, data_role)
        turns = [{spec["role_key"]: names[m["role"]], spec["content_key"]: m["content"]} for m in prompt + [final]]
        return {spec["field"]: turns, **where}
    response = _response_field(template)
    if response is None:
        return None
    if all(name in row for name in template.required if name != response):
        extra = set(_PAIR_FIELDS + _KTO_FIELDS) - {response}
        return {**{k: v for k, v in row.items() if k not in extra}, response: final["content"]}
    if len(prompt) != 1:
        return None
    user = [m for m in template.messages if m.get("role") == "user"]
    match = _FIELD_ONLY.fullmatch(str(user[0].get("content", ""))) if len(user) == 1 else None
    if match is None:
        return None
    return {match.group(1): prompt[0]["content"], response: final["content"], **where}


class _Given(Template):
    """The template with each row's conversation given (`_messages`): tokenize_many then renders it as SFT does."""

    def conversation(self, row: dict) -> list[dict]:
        return row["_messages"]


def _tokenized(tokenizer, template, rows: list[_Row], kind, data_cfg, not_kept, advance=None):
    """(pairs or samples, kept per row, rows truncated): each row's conversations tokenized, split at the final
    assistant message, and fitted to data.max_length as one unit (prompt + its longest completion)."""
    given = _Given(**{f.name: getattr(template, f.name) for f in dataclasses.fields(Template)})
    flat = [{"_messages": c, "_where": r.where} for r in rows for c in r.conversations]
    samples = iter(tokenize_many(tokenizer, given, flat, False, advance))
    items, kept, truncated = [], [], 0
    for row in rows:
        parts = [next(samples) for _ in row.conversations]
        prompts = [s.input_ids[: s.final_response_start] for s in parts]
        completions = [s.input_ids[s.final_response_start :] for s in parts]
        prompt = prompts[0]
        if kind == "paired" or len(parts) > 1:
            if any(p != prompt for p in prompts):
                not_kept.append(
                    NotKept(
                        row.where, "prompt_mismatch", "chosen and rejected tokenize to different prompts", _raw(row.raw)
                    )
                )
                kept.append(False)
                continue
        longest = max(len(c) for c in completions)
        cut = len(prompt) + longest - data_cfg.max_length
        if cut > 0:
            reason = "overlength"
            if data_cfg.overlength == "truncate_prompt_left":
                reason = "response_too_long" if cut >= len(prompt) else None
            if reason:
                detail = f"{len(prompt)} prompt + {longest} completion tokens > data.max_length={data_cfg.max_length}"
                not_kept.append(NotKept(row.where, reason, detail, _raw(row.raw)))
                kept.append(False)
                continue
            prompt, truncated = prompt[cut:], truncated + 1
        if kind == "paired":
            items.append(PreferencePair(prompt, completions[0], completions[1], row.where))
        else:
            items += [PreferenceSample(prompt, c, label, row.where) for c, label in zip(completions, row.labels)]
        kept.append(True)
    return items, kept, truncated


def _accounting(kind, rows_read, not_kept, train, evals, kept_train, kept_eval, truncated) -> dict:
    """SFT's accounting keys where they mean something; tokens are those the trainer forwards (prompt once per
    completion), trained tokens those it scores (completions)."""

    def forwarded(item) -> int:
        if kind == "paired":
            return 2 * len(item.prompt_ids) + len(item.chosen_ids) + len(item.rejected_ids)
        return len(item.prompt_ids) + len(item.completion_ids)

    def scored(item) -> int:
        return len(item.chosen_ids) + len(item.rejected_ids) if kind == "paired" else len(item.completion_ids)

    def longest(item) -> int:
        if kind == "paired":
            return len(item.prompt_ids) + max(len(item.chosen_ids), len(item.rejected_ids))
        return len(item.prompt_ids) + len(item.completion_ids)

    lengths = sorted(longest(item) for item in train)
    keys = {(tuple(i.input_ids), tuple(i.labels)) for i in train}
    accounting = {
        "kind": kind,
        "rows_read": rows_read,
        "train_rows": sum(kept_train),
        "eval_rows": sum(kept_eval),
        "rows_rejected": dict(Counter(n.reason for n in not_kept if n.reason not in DROP_REASONS)),
        "rows_dropped": dict(Counter(n.reason for n in not_kept if n.reason in DROP_REASONS)),
        "rows_truncated": truncated,
        "train_samples": len(train),
        "train_tokens": sum(forwarded(i) for i in train),
        "train_trained_tokens": sum(scored(i) for i in train),
        "eval_samples": len(evals),
        "eval_tokens": sum(forwarded(i) for i in evals),
        "token_length": {
            p: lengths[min(len(lengths) - 1, int(q * len(lengths)))] if lengths else 0
            for p, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))
        }
        | {"max": lengths[-1] if lengths else 0},
        "duplicate_train_samples": len(train) - len(keys),
        "eval_samples_in_train": sum(1 for i in evals if (tuple(i.input_ids), tuple(i.labels)) in keys),
        "packing": None,
        "batching": BATCHING,
    }
    if kind == "paired":
        accounting |= {"pairs": len(train), "eval_pairs": len(evals)}
    else:
        desirable = sum(1 for s in train if s.label)
        accounting |= {
            "desirable": desirable,
            "undesirable": len(train) - desirable,
            "eval_desirable": sum(1 for s in evals if s.label),
            "eval_undesirable": sum(1 for s in evals if not s.label),
        }
    return accounting
