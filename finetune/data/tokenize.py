"""Rows -> template -> token ids with a loss mask -> (packed) train/eval datasets, with exact row accounting.

The loss mask is built here, not by trl: every assistant message (its content and the EOS that ends it) is
trained, everything else is -100, unless `data.train_on_inputs`. Padding is masked later by the collator from
sequence lengths, never by comparing token ids, so padding with EOS (GPT-Neo and GPT-J have no pad token) cannot
erase the EOS label the model needs to learn to stop.

Accounting invariant, stored in run.json: rows_read = train_rows + eval_rows + rejected (by reason) + dropped (by
reason). Rejected rows could not be read (not_utf8, invalid_json, not_an_object, bad_record, row_too_large,
nul_character, duplicate_key: finetune.data.sources) or do not fit the template (missing_field, empty_field,
wrong_type, bad_conversation); dropped rows were read but cannot be trained
under the length policy (overlength, response_too_long, no_trainable_tokens).
"""

from __future__ import annotations

import contextlib
import functools
import json
import random
import re
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from finetune.data import packing, sources
from finetune.data.templates import Template
from finetune.errors import ConfigError, DataError

IGNORE_INDEX = packing.IGNORE_INDEX
LENGTH_POLICIES = ("drop", "error", "truncate_prompt_left", "chunk")
DROP_REASONS = ("overlength", "response_too_long", "no_trainable_tokens")  # readable rows the length policy drops


@dataclass
class Sample:
    """One tokenized training sequence; `where` points back at the source row (file:line) for messages."""

    input_ids: list[int]
    labels: list[int]
    where: str
    final_response_start: int = 0
    """Index of the first token of the last trained piece: what truncation must never cut."""

    @property
    def trained(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


@dataclass
class NotKept:
    """A row that will not train, and why (written to rejected_rows.jsonl in the run directory)."""

    where: str
    reason: str
    detail: str
    raw: str

    def as_dict(self) -> dict:
        return {"where": self.where, "reason": self.reason, "detail": self.detail, "raw": self.raw}


@dataclass
class PreparedData:
    train: list[Sample]
    eval: list[Sample]
    eval_rows: list[dict]
    accounting: dict = field(default_factory=dict)
    not_kept: list[NotKept] = field(default_factory=list)
    packed: list[packing.PackedRow] | None = None
    notes: list[str] = field(default_factory=list)
    """How sources were read, when that is worth a log line (a UTF-16 file read as UTF-16)."""

    def as_datasets(self):
        """Hugging Face datasets with exactly the columns the trainer consumes (packed rows carry position_ids)."""
        from datasets import Dataset

        if self.packed is not None:
            train = Dataset.from_dict(
                {
                    "input_ids": [r.input_ids for r in self.packed],
                    "labels": [r.labels for r in self.packed],
                    "position_ids": [r.position_ids for r in self.packed],
                }
            )
        else:
            train = _samples_dataset(self.train)
        return train, (_samples_dataset(self.eval) if self.eval else None)


def _samples_dataset(samples: list[Sample]):
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": [s.input_ids for s in samples], "labels": [s.labels for s in samples]})


def render(tokenizer, template: Template, conversation: list[dict], add_generation_prompt: bool = False) -> str:
    """Text of a conversation, through the tokenizer's own chat-template machinery (what inference uses)."""
    if not conversation:
        return ""
    return tokenizer.apply_chat_template(
        conversation, chat_template=template.chat_template, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def prompt_text(tokenizer, template: Template, row: dict) -> str:
    """The prompt for the row's last assistant message, ready for generation. Raw text (the completion template)
    has no prompt before it: its first words (a quarter, at most 32) are the prompt, so the model continues them."""
    conversation = template.conversation(row)
    last = max(i for i, m in enumerate(conversation) if m["role"] == "assistant")
    prompt = render(tokenizer, template, conversation[:last], add_generation_prompt=True)
    if prompt.strip():
        return prompt
    text = str(conversation[last]["content"])
    words = max(1, min(32, len(text.split()) // 4))
    return re.match(rf"(?:\s*\S+){{{words}}}", text).group(0)  # an exact prefix of the text: spacing kept


def segments(tokenizer, template: Template, conversation: list[dict]) -> list[tuple[str, bool]]:
    """The conversation's text cut into (text, trained) pieces: each assistant message is trained, the rest is not.

    Built by rendering growing prefixes of the conversation, so the pieces join to exactly the text the chat template
    renders for the whole conversation (what the saved tokenizer reproduces at inference).
    """
    return _segments_many(_ChatRenderer(tokenizer, template), template, [conversation])[0]


def tokenize(tokenizer, template: Template, row: dict, train_on_inputs: bool = False) -> Sample:
    """Token ids and labels of one checked row; every trained piece must end with EOS."""
    return tokenize_many(tokenizer, template, [row], train_on_inputs)[0]


def tokenize_many(
    tokenizer,
    template: Template,
    rows: list[dict],
    train_on_inputs: bool = False,
    on_rows: Callable[[int], None] | None = None,
) -> list[Sample]:
    """tokenize() for many rows: prefixes rendered by one `_ChatRenderer`, then batched tokenizer calls (the Rust
    tokenizer uses every core). Same ids and labels as tokenize() row by row (tests/test_data.py checks them against
    the plain apply_chat_template algorithm).

    Above `_CHUNK_ROWS` rows, chunks are tokenized in a worker thread while the next chunk is rendered: the Rust
    tokenizer releases the GIL, so rendering (Python) and tokenizing (Rust) run on different cores at once.
    `on_rows(n)` is told as each chunk of n rows is tokenized (from the worker thread): a progress bar's update.
    """
    renderer, eos = _ChatRenderer(tokenizer, template), tokenizer.eos_token_id
    chunks = [rows[i : i + _CHUNK_ROWS] for i in range(0, len(rows), _CHUNK_ROWS)]
    with packing.gc_paused():
        if len(chunks) <= 1:
            pieces = _segments_many(renderer, template, [template.conversation(row) for row in rows])
            samples = _assemble(template, rows, pieces, _encode(tokenizer, _texts(pieces)), eos, train_on_inputs)
            if on_rows is not None:
                on_rows(len(rows))
            return samples
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="finetune-tokenize") as worker:
            parts = []
            try:
                for chunk in chunks:  # every chunk is rendered (and checked) before any is assembled, as in one batch
                    pieces = _segments_many(renderer, template, [template.conversation(row) for row in chunk])
                    future = worker.submit(_encode, tokenizer, _texts(pieces))
                    if on_rows is not None:
                        future.add_done_callback(functools.partial(_tell, on_rows, len(chunk)))
                    parts.append((chunk, pieces, future))
            except BaseException:
                for *_, future in parts:
                    future.cancel()
                raise
            samples = []
            for chunk, pieces, future in parts:
                samples += _assemble(template, chunk, pieces, future.result(), eos, train_on_inputs)
    return samples


_CHUNK_ROWS = 2048


def _tell(on_rows: Callable[[int], None], rows: int, future) -> None:
    if not future.cancelled():
        on_rows(rows)


def _texts(pieces: list[list[tuple[str, bool]]]) -> list[str]:
    return [text for row_pieces in pieces for text, _ in row_pieces]


def _assemble(
    template: Template,
    rows: list[dict],
    pieces: list[list[tuple[str, bool]]],
    encoded: list[list[int]],
    eos: int,
    train_on_inputs: bool,
) -> list[Sample]:
    """Samples from each row's pieces and their token ids (in order): trained pieces keep their ids as labels."""
    encoded, samples = iter(encoded), []
    for row, row_pieces in zip(rows, pieces):
        ids, labels, final_response_start = [], [], 0
        for (_, trained), piece in zip(row_pieces, encoded):
            if trained:
                final_response_start = len(ids)
                if piece[-1] != eos:
                    raise ConfigError(
                        f"data.template {template.path}: an assistant message of {row.get('_where')} does not end "
                        f"with EOS; end it with {{{{ eos_token }}}} in the chat template"
                    )
                labels += piece
            else:
                labels += piece if train_on_inputs else [IGNORE_INDEX] * len(piece)
            ids += piece
        samples.append(Sample(ids, labels, str(row.get("_where")), final_response_start))
    return samples


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    """`tokenizer(texts, add_special_tokens=False)["input_ids"]`, read straight from the Rust tokenizer when that is
    the same call.

    Why: for a fast tokenizer, transformers sets the backend's truncation and padding to the call's (none here), runs
    `encode_batch` and copies every encoding's ids, type ids and attention mask into Python lists; asking the backend
    for the ids alone (`encode_batch_fast`, no character offsets) is ~15% less tokenizer time. Taken only when the
    backend has no truncation, padding or special-token splitting that the call would change, and the tokenizer class
    does not override transformers' encode path; anything else (slow tokenizers too) goes through `tokenizer(...)`.
    """
    if not texts:
        return []
    backend = _plain_backend(tokenizer)
    if backend is None:
        return tokenizer(texts, add_special_tokens=False)["input_ids"]
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    return [encoding.ids for encoding in encode(texts, add_special_tokens=False)]


def _plain_backend(tokenizer):
    """The Rust tokenizer behind `tokenizer` when `tokenizer(texts, add_special_tokens=False)` only calls its
    encode_batch; None otherwise."""
    try:
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:
        return None
    cls, backend = type(tokenizer), getattr(tokenizer, "_tokenizer", None)
    if (
        not isinstance(tokenizer, TokenizersBackend)
        or backend is None
        or cls.__call__ is not PreTrainedTokenizerBase.__call__
        or cls._encode_plus is not TokenizersBackend._encode_plus
        or hasattr(tokenizer, "_switch_to_input_mode")
    ):
        return None
    if (
        backend.truncation is not None
        or backend.padding is not None
        or backend.encode_special_tokens != bool(tokenizer.split_special_tokens)
    ):
        return None
    return backend


def _segments_many(
    renderer: _ChatRenderer, template: Template, conversations: list[list[dict]]
) -> list[list[tuple[str, bool]]]:
    """segments() of each conversation, with every prefix rendered in two batched renderer calls.

    For assistant message i: prompt = messages 0..i-1 with the generation prompt, upto = messages 0..i; the pieces
    are prompt minus the text before it (not trained) and upto minus prompt (trained). Empty pieces are left out.
    """
    turns = [[i for i, m in enumerate(conversation) if m["role"] == "assistant"] for conversation in conversations]
    prepared = [
        renderer.prepare(conversation) if ix else (conversation, True) for conversation, ix in zip(conversations, turns)
    ]
    prompts = iter(
        renderer([(c[:i], plain) for (c, plain), ix in zip(prepared, turns) for i in ix], add_generation_prompt=True)
    )
    uptos = iter(
        renderer(
            [(c[: i + 1], plain) for (c, plain), ix in zip(prepared, turns) for i in ix], add_generation_prompt=False
        )
    )
    result = []
    for ix in turns:
        pieces, done = [], ""
        for i in ix:
            prompt, upto = next(prompts), next(uptos)
            if not prompt.startswith(done) or not upto.startswith(prompt):
                raise ConfigError(
                    f"data.template {template.path}: rendering messages 0..{i} does not extend the text of the "
                    "messages "
                    f"before it; a chat template must render a conversation as the concatenation of its turns"
                )
            if len(prompt) > len(done):
                pieces.append((prompt[len(done) :], False))
            if len(upto) > len(prompt):
                pieces.append((upto[len(prompt) :], True))
            done = upto
        result.append(pieces)
    return result


class _ChatRenderer:
    """Renders conversations to exactly the text `render()` (tokenizer.apply_chat_template) gives, in half the time.

    Why: data preparation renders two prefixes per assistant message, and apply_chat_template spends most of each
    call on set-up (special-token map, template lookup, a deep copy of the messages and of every keyword through
    `_plain_template_data`). This does that set-up once: the template comes from transformers' own compile cache
    (`chat_template_utils._compile_jinja_template`, the sandboxed environment apply_chat_template renders with) and
    is rendered with the arguments `render_jinja_template` passes. A conversation whose messages are not plain
    string-to-string dicts, or carry reasoning fields (which transformers rewrites), goes through
    `render_jinja_template` itself. tests/test_data.py compares both paths token for token on every template.
    """

    def __init__(self, tokenizer, template: Template):
        from transformers.utils import chat_template_utils

        self._library = chat_template_utils
        self._chat_template = tokenizer.get_chat_template(template.chat_template)
        self._kwargs = dict(tokenizer.special_tokens_map)
        compile_template = getattr(
            chat_template_utils, "_compile_jinja_template", None
        )  # absent: everything takes the slow path
        self._render = compile_template(self._chat_template).render if compile_template else None
        self._reasoning = frozenset(
            getattr(chat_template_utils, "_REASONING_FIELDS", ("reasoning_content", "thinking", "reasoning"))
        )

    def prepare(self, conversation: list[dict]) -> tuple[list[dict], bool]:
        """The messages as apply_chat_template hands them over (keys whose value is None dropped), and whether they
        are plain: what transformers' conversion (`_plain_template_data`, `_alias_reasoning_fields`) would give back
        as equal dicts of the same strings, so they can be rendered as they are. Checked once per conversation, not
        per prefix."""
        messages = [
            {k: v for k, v in m.items() if v is not None} if any(v is None for v in m.values()) else m
            for m in conversation
        ]
        plain = self._render is not None and all(
            type(m) is dict
            and self._reasoning.isdisjoint(m)
            and all(type(k) is str and type(v) is str for k, v in m.items())
            for m in messages
        )
        return messages, plain

    def __call__(self, conversations: list[tuple[list[dict], bool]], add_generation_prompt: bool = False) -> list[str]:
        """The text of each prepared conversation ("" for an empty one, as render() gives)."""
        texts, slow = [], []
        render, kwargs = self._render, self._kwargs
        for messages, plain in conversations:
            if not messages:
                texts.append("")
            elif plain:
                texts.append(
                    render(
                        messages=messages,
                        tools=None,
                        documents=None,
                        add_generation_prompt=add_generation_prompt,
                        **kwargs,
                    )
                )
            else:
                slow.append((len(texts), messages))
                texts.append(None)
        if slow:
            rendered, _ = self._library.render_jinja_template(
                conversations=[m for _, m in slow],
                chat_template=self._chat_template,
                add_generation_prompt=add_generation_prompt,
                **kwargs,
            )
            for (at, _), text in zip(slow, rendered):
                texts[at] = text
        return texts


def fit_length(sample: Sample, max_length: int, policy: str) -> tuple[list[Sample], str | None]:
    """Apply data.overlength to one sample: (samples to train, None) or ([], reason it is dropped)."""
    if len(sample.input_ids) <= max_length:
        return [sample], None
    if policy in ("drop", "error"):
        return [], "overlength"
    if policy == "truncate_prompt_left":
        cut = len(sample.input_ids) - max_length
        if cut > sample.final_response_start:  # the final response must survive whole, never cut to nothing
            return [], "response_too_long"
        return [
            Sample(sample.input_ids[cut:], sample.labels[cut:], sample.where, sample.final_response_start - cut)
        ], None
    pieces = [
        Sample(sample.input_ids[i : i + max_length], sample.labels[i : i + max_length], sample.where)
        for i in range(0, len(sample.input_ids), max_length)
    ]
    pieces = [p for p in pieces if p.trained]
    return pieces, (None if pieces else "no_trainable_tokens")


def prepare(data_cfg, tokenizer, template: Template, seed: int, progress=None, batch_size: int = 8) -> PreparedData:
    """Read, check, split, tokenize, length-fit and (optionally) pack the data named by `data_cfg` (conf/data).

    `batch_size`: samples per device batch, which data.packing=auto weighs packing against
    (finetune.data.packing.choose).

    `progress(total_rows)`: a context manager yielding `advance(n)`, told as rows are templated and tokenized (a bar:
    finetune.progress.rows_bar)."""
    columns = dict(data_cfg.columns or {})
    read, eval_read = sources.read_train_and_held_out(data_cfg, columns)
    not_kept = [NotKept(r.where, r.kind, r.reason, r.raw) for r in read.rejected + eval_read.rejected]
    train_rows = _checked(read.rows, template, columns, not_kept)
    eval_rows = _checked(eval_read.rows, template, columns, not_kept)
    rows_read = len(read.rows) + len(read.rejected) + len(eval_read.rows) + len(eval_read.rejected)
    if not_kept and not data_cfg.skip_invalid:
        raise DataError(
            _listing(
                not_kept,
                "bad row(s)",
                "fix them, or set data.skip_invalid=true to drop them and list them in rejected_rows.jsonl",
            )
        )
    if not (data_cfg.eval_path or data_cfg.eval_split):
        train_rows, eval_rows = _split(train_rows, data_cfg.eval_fraction, seed)

    with progress(len(train_rows) + len(eval_rows)) if progress else contextlib.nullcontext() as advance:
        train, kept_train, truncated = _tokenize_all(tokenizer, template, train_rows, data_cfg, not_kept, advance)
        evals, kept_eval, truncated_eval = _tokenize_all(tokenizer, template, eval_rows, data_cfg, not_kept, advance)
    refuse_not_kept(not_kept, rows_read, data_cfg, LENGTH_POLICIES)
    if not train:
        raise DataError(f"{data_cfg.path}: no training rows left after checks, split and length policy")

    packed, batching = packing.choose(train, data_cfg.max_length, data_cfg.packing, batch_size, seed)
    accounting = _accounting(
        rows_read, not_kept, train, evals, kept_train, kept_eval, truncated + truncated_eval, packed, data_cfg
    )
    accounting["batching"] = batching
    kept_eval_rows = [row for row, kept in zip(eval_rows, kept_eval) if kept]
    return PreparedData(train, evals, kept_eval_rows, accounting, not_kept, packed, read.notes + eval_read.notes)


def describe(data: PreparedData) -> list[str]:
    """The row accounting and token statistics, as log lines (train log, finetune.preview)."""
    a = data.accounting
    not_kept = {**a["rows_rejected"], **a["rows_dropped"]}
    why = ", ".join(f"{n} {reason}" for reason, n in not_kept.items()) or "none"
    lines = [
        f"data: {a['rows_read']} rows read = {a['train_rows']} train + {a['eval_rows']} held out + "
        f"{sum(not_kept.values())} not kept ({why})"
        + (f"; {a['rows_truncated']} truncated from the left" if a["rows_truncated"] else ""),
        f"data: {a['train_samples']} train samples, {a['train_tokens']:,} tokens, {a['train_trained_tokens']:,} "
        "trained; "
        f"length p50 {a['token_length']['p50']}, p90 {a['token_length']['p90']}, p99 {a['token_length']['p99']}, max "
        f"{a['token_length']['max']}",
    ]
    lines.append(_batching_line(a))
    return lines + notes_and_warnings(data)


def notes_and_warnings(data) -> list[str]:
    """The log lines every data description ends with: how sources were read, and duplicate or leaked samples."""
    a = data.accounting
    lines = [f"data: {note}" for note in data.notes]
    if a["duplicate_train_samples"] or a["eval_samples_in_train"]:
        lines.append(
            f"warning: {a['duplicate_train_samples']} duplicate train samples, {a['eval_samples_in_train']} held-out "
            "samples also in train"
        )
    return lines


def _batching_line(a: dict) -> str:
    """How the train set is batched and what the other choice would compute (data.packing=true | false | auto)."""
    b = a["batching"]
    padded = f"padded batches of {b['batch_size']} samples are {b['padded_efficiency']:.1%} tokens"
    packed = (
        f"batches of {b['batch_size']} packed rows ({b['packed_rows']:,} rows of {b['max_length']}) are "
        f"{b['packed_efficiency']:.1%} tokens"
    )
    gain = f"{packing.AUTO_MIN_GAIN - 1:.0%}"
    why = (
        f"data.packing=auto packs when that saves {gain} or more"
        if b["setting"] == "auto"
        else f"data.packing={str(b['setting']).lower()}"
    )
    return f"data: {'packing' if b['packed'] else 'no packing'} ({why}): {packed}, {padded}"


def refuse_not_kept(not_kept: list[NotKept], rows_read: int, data_cfg, policies: tuple[str, ...]) -> None:
    """data.overlength=error with rows too long, or more rows not kept than data.max_dropped_fraction: DataError."""
    too_long = [n for n in not_kept if n.reason in ("overlength", "response_too_long")]
    if too_long and data_cfg.overlength == "error":
        raise DataError(
            _listing(
                too_long,
                f"row(s) longer than data.max_length={data_cfg.max_length}",
                f"raise data.max_length, or set data.overlength={' | '.join(p for p in policies if p != 'error')}",
            )
        )
    dropped = len(not_kept)
    if rows_read and dropped / rows_read > data_cfg.max_dropped_fraction:
        reasons = ", ".join(f"{n} {r}" for r, n in Counter(n.reason for n in not_kept).items())
        raise DataError(
            f"{dropped} of {rows_read} rows ({dropped / rows_read:.1%}) would not train ({reasons}), above "
            f"data.max_dropped_fraction={data_cfg.max_dropped_fraction}; fix the data, raise data.max_length, "
            f"or raise data.max_dropped_fraction"
        )


def _checked(rows: list[dict], template: Template, columns: dict, not_kept: list[NotKept]) -> list[dict]:
    """Rows that fit the template; the others go to not_kept with every problem named."""
    good = []
    for row in rows:
        problems = template.check_row(row, columns)
        if problems:
            not_kept.append(NotKept(row["_where"], problems[0].kind, "; ".join(p.text for p in problems), _raw(row)))
        else:
            good.append(row)
    return good


def _tokenize_all(tokenizer, template, rows, data_cfg, not_kept, on_rows=None) -> tuple[list[Sample], list[bool], int]:
    samples, kept, truncated = [], [], 0
    for row, sample in zip(rows, tokenize_many(tokenizer, template, rows, data_cfg.train_on_inputs, on_rows)):
        fitted, reason = fit_length(sample, data_cfg.max_length, data_cfg.overlength)
        if reason:
            not_kept.append(
                NotKept(
                    sample.where,
                    reason,
                    f"{len(sample.input_ids)} tokens > data.max_length={data_cfg.max_length}",
                    _raw(row),
                )
            )
        truncated += (
            len(sample.input_ids) > data_cfg.max_length and data_cfg.overlength == "truncate_prompt_left" and not reason
        )
        samples += fitted
        kept.append(not reason)
    return samples, kept, truncated


def _accounting(rows_read, not_kept, train, evals, kept_train, kept_eval, truncated, packed, data_cfg) -> dict:
    lengths = sorted(len(s.input_ids) for s in train)
    train_keys = {tuple(s.input_ids) for s in train}
    accounting = {
        "rows_read": rows_read,
        "train_rows": sum(kept_train),
        "eval_rows": sum(kept_eval),
        "rows_rejected": dict(Counter(n.reason for n in not_kept if n.reason not in DROP_REASONS)),
        "rows_dropped": dict(Counter(n.reason for n in not_kept if n.reason in DROP_REASONS)),
        "rows_truncated": truncated,
        "train_samples": len(train),
        "train_tokens": sum(lengths),
        "train_trained_tokens": sum(s.trained for s in train),
        "eval_tokens": sum(len(s.input_ids) for s in evals),
        "token_length": {
            p: lengths[min(len(lengths) - 1, int(q * len(lengths)))]
            for p, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))
        }
        | {"max": lengths[-1] if lengths else 0},
        "duplicate_train_samples": len(train) - len(train_keys),
        "eval_samples_in_train": sum(1 for s in evals if tuple(s.input_ids) in train_keys),
        "packing": None,
    }
    if packed is not None:
        accounting["packing"] = {
            "rows": len(packed),
            "max_length": data_cfg.max_length,
            "efficiency": round(packing.efficiency(packed, data_cfg.max_length), 4),
        }
    return accounting


def _split(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Seeded hold-out: the same rows are held out on every run with the same seed."""
    if fraction <= 0:
        return rows, []
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(fraction * len(rows)))
    held = set(order[:n_eval])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def _raw(row: dict) -> str:
    return json.dumps({k: v for k, v in row.items() if not k.startswith("_")}, ensure_ascii=False, default=str)[:2000]


def _listing(items: list[NotKept], what: str, fix: str) -> str:
    items = sorted(items, key=lambda n: [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", n.where)])
    shown = [f"  {n.where}: {n.detail}" for n in items[: sources.MAX_REPORTED]]
    more = [f"  ... and {len(items) - sources.MAX_REPORTED} more"] if len(items) > sources.MAX_REPORTED else []
    return "\n".join([f"{len(items)} {what}:", *shown, *more, f"  fix: {fix}"])
