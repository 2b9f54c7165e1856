"""Data templates: how a row becomes a conversation, and how a conversation becomes text.

A template is a YAML file (see data_templates/README.md) of one of two kinds:
- `fields` + `messages`: named row fields rendered into a fixed list of messages (alpaca, dolly, prompt/completion,
  plain-text completion);
- `conversation`: the row already holds a list of messages (chatml `messages`, ShareGPT `conversations`); the
  template names the list field, the keys of role and content, and maps the data's role names to ours.
Field values are rendered into messages with a sandboxed Jinja environment (a template is data, never code);
messages become text through the tokenizer's own `apply_chat_template` with the template's chat template, which is
saved into the trained tokenizer so inference renders prompts exactly as training did. Every `assistant` message
is trained; everything else is prompt.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import NamedTuple

import yaml
from jinja2 import StrictUndefined, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from finetune.config.compose import TEMPLATES_DIR
from finetune.errors import ConfigError, closest

_JINJA = ImmutableSandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True)
ROLES = ("system", "user", "assistant")
TOP_LEVEL_KEYS = ("description", "fields", "messages", "conversation", "chat_template", "example", "options")
CONVERSATION_KEYS = ("field", "role_key", "content_key", "roles")


class Problem(NamedTuple):
    """What is wrong with a row: `kind` is the count key in the row accounting, `text` names the field."""

    kind: str  # missing_field | empty_field | wrong_type | bad_conversation
    text: str


@dataclass(frozen=True)
class Template:
    """A loaded, checked data template."""

    name: str
    path: Path
    chat_template: str
    required: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    messages: tuple[dict, ...] = ()
    conversation_spec: dict = field(default_factory=dict)
    description: str = ""
    example: dict = field(default_factory=dict)
    """A row this template accepts, rendered in data_templates/README.md (and by the tests)."""
    options: tuple[str, ...] = ()
    """Labelled data: the answers a row may have (finetune.evaluate scores each one's log-likelihood)."""
    options_field: str | None = None
    """Labelled data whose options differ per row: the row field holding the list."""

    @property
    def fields(self) -> tuple[str, ...]:
        """The row fields this template reads (what `data.columns` may map)."""
        return (self.conversation_spec["field"],) if self.conversation_spec else self.required + self.optional

    def conversation(self, row: dict) -> list[dict]:
        """The row as a list of {role, content, ...} messages (call check_row first)."""
        if self.conversation_spec:
            spec = self.conversation_spec
            return [
                {"role": spec["roles"][m[spec["role_key"]]], "content": m[spec["content_key"]]}
                for m in row[spec["field"]]
            ]
        values = {name: row.get(name) or "" for name in self.optional}
        values.update({name: row[name] for name in self.required})
        return [
            {key: text.render(values) if hasattr(text, "render") else text for key, text in message.items()}
            for message in self._compiled_messages
        ]

    @cached_property
    def _compiled_messages(self) -> list[dict]:
        """The message templates compiled once (compiling per row cost ~90% of data preparation)."""
        return [
            {key: _compile(text) if isinstance(text, str) else text for key, text in message.items()}
            for message in self.messages
        ]

    def check_row(self, row: dict, columns: dict | None = None) -> list[Problem]:
        """Problems with one row, each naming the field (the caller adds file:line)."""
        if self.conversation_spec:
            return self._check_conversation(row, columns or {})
        present = [k for k in row if not k.startswith("_")]
        problems = []
        for name in self.required:
            value = row.get(name)
            if name not in row:
                problems.append(
                    Problem("missing_field", f"missing field '{name}'{_missing_hint(name, present, columns or {})}")
                )
            elif not isinstance(value, str):
                problems.append(Problem("wrong_type", f"field '{name}' must be a string, got {type(value).__name__}"))
            elif not value.strip():
                problems.append(Problem("empty_field", f"field '{name}' is empty"))
        for name in self.optional:
            value = row.get(name)
            if value is not None and not isinstance(value, str):
                problems.append(
                    Problem("wrong_type", f"field '{name}' must be a string or missing, got {type(value).__name__}")
                )
        return problems

    def _check_conversation(self, row: dict, columns: dict) -> list[Problem]:
        """torchtune-style message checks: known roles, system first only, user/assistant alternate, assistant last."""
        spec = self.conversation_spec
        name = spec["field"]
        if name not in row:
            return [
                Problem(
                    "missing_field",
                    f"missing field '{name}'{_missing_hint(name, [k for k in row if not k.startswith('_')], columns)}",
                )
            ]
        problem = self._conversation_problem(row[name])
        return [Problem("bad_conversation", problem)] if problem else []

    def _conversation_problem(self, turns) -> str | None:
        spec = self.conversation_spec
        name = spec["field"]
        if not isinstance(turns, list) or not turns:
            return f"field '{name}' must be a non-empty list of messages, got {type(turns).__name__}"
        roles = []
        for i, turn in enumerate(turns):
            where = f"{name}[{i}]"
            if not isinstance(turn, dict):
                return (
                    f"{where}: expected an object with '{spec['role_key']}' and '{spec['content_key']}', "
                    f"got {type(turn).__name__}"
                )
            role, content = turn.get(spec["role_key"]), turn.get(spec["content_key"])
            if role not in spec["roles"]:
                return f"{where}.{spec['role_key']}: unknown role {role!r}; this template knows {sorted(spec['roles'])}"
            if not isinstance(content, str) or not content.strip():
                return f"{where}.{spec['content_key']}: must be a non-empty string"
            roles.append(spec["roles"][role])
        body = roles[1:] if roles[0] == "system" else roles
        if "system" in body:
            return f"{name}[{roles.index('system', 1)}]: a system message may only come first"
        if not body:
            return f"field '{name}' has only a system message"
        for i, role in enumerate(body):
            expected = "a user" if i % 2 == 0 else "an assistant"
            if role != expected.split()[1]:
                return (
                    f"{name}[{i + len(roles) - len(body)}]: expected {expected} message "
                    f"(user and assistant alternate, user first), got {role}"
                )
        if body[-1] != "assistant":
            return f"{name}: the last message must be an assistant message (it is what the model learns to write)"
        return None


_FIELD_ONLY = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
_JINJA_LITERALS = {"true", "false", "none", "True", "False", "None"}


def _compile(text: str):
    """A message template: plain text stays text, `{{ name }}` alone becomes a `_Field`, anything else is compiled.

    Jinja renders text without markup as itself (it only normalises line endings, hence the `\\r` check)."""
    if "{" not in text and "\r" not in text:
        return text
    match = _FIELD_ONLY.fullmatch(text)
    if match and match.group(1) not in _JINJA_LITERALS:
        return _Field(match.group(1), _JINJA.from_string(text))
    return _JINJA.from_string(text)


class _Field:
    """A message template that is one field reference (`{{ output }}`): the row's string as it is.

    Jinja renders `{{ name }}` of a string value as that same string; skipping its render (a new context per call)
    took conversation() of an Alpaca row from ~55 us to ~4 us, a tenth of data preparation before this.
    Any other value (missing, not exactly a str) goes through the compiled Jinja template, as before.
    """

    __slots__ = ("name", "template")

    def __init__(self, name: str, template):
        self.name, self.template = name, template

    def render(self, values: dict) -> str:
        value = values.get(self.name)
        return value if type(value) is str else self.template.render(values)


def _missing_hint(name: str, present: list[str], columns: dict) -> str:
    if name in columns:
        return f" (data.columns.{name}={columns[name]}, but the row has: {', '.join(present)})"
    close = closest(name, present)
    if close:
        return f" (did you mean '{close[0]}'? map it with data.columns.{name}={close[0]})"
    return f" (row has: {', '.join(present)}; map one with data.columns.{name}=COLUMN)"


def resolve_path(name_or_path: str) -> Path:
    """`alpaca` -> data_templates/alpaca.yaml; anything with a slash or .yaml suffix is a path."""
    if "/" in name_or_path or name_or_path.endswith((".yaml", ".yml")):
        return Path(name_or_path).expanduser()
    return TEMPLATES_DIR / f"{name_or_path}.yaml"


def available() -> list[str]:
    return sorted(p.stem for p in TEMPLATES_DIR.glob("*.yaml"))


def load(name_or_path: str) -> Template:
    """Load and check a template; every problem names the file and the key."""
    path = resolve_path(name_or_path)
    if not path.is_file():
        raise ConfigError(
            f"data.template: no template '{name_or_path}' ({path}); choose one of {available()} or give a YAML path"
        )
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"data.template: {path} is not valid YAML: {err}") from err
    problems = _check(spec, path)
    if problems:
        raise ConfigError(problems)
    common = {
        "name": path.stem,
        "path": path,
        "chat_template": spec["chat_template"],
        "description": spec.get("description", ""),
        "example": spec.get("example") or {},
        **_options(spec.get("options")),
    }
    if "conversation" in spec:
        return Template(**common, conversation_spec=spec["conversation"])
    fields = spec["fields"]
    return Template(
        **common,
        required=tuple(k for k, v in fields.items() if v == "required"),
        optional=tuple(k for k, v in fields.items() if v == "optional"),
        messages=tuple(spec["messages"]),
    )


def _options(spec) -> dict:
    """`options: [Yes, No]` (the same answers for every row) or `options: {field: choices}` (a list in each row)."""
    if isinstance(spec, dict):
        return {"options_field": spec["field"]}
    return {"options": tuple(str(o) for o in spec or ())}


def _check(spec, path: Path) -> list[str]:
    if not isinstance(spec, dict):
        return [f"{path}: a template is a YAML mapping (see data_templates/README.md)"]
    unknown = set(spec) - set(TOP_LEVEL_KEYS)
    problems = [f"{path}: unknown key '{k}' (allowed: {', '.join(TOP_LEVEL_KEYS)})" for k in sorted(unknown)]
    options = spec.get("options")
    if options is not None and not (
        isinstance(options, list)
        and len(options) >= 2
        and all(isinstance(o, (str, int, float)) for o in options)
        or isinstance(options, dict)
        and set(options) == {"field"}
        and isinstance(options["field"], str)
    ):
        problems.append(
            f"{path}: 'options' is a list of at least two answers ([Yes, No]) or {{field: NAME}} for a per-row list"
        )
    if "chat_template" not in spec:
        problems.append(f"{path}: missing key 'chat_template'")
    if "conversation" in spec:
        problems += [f"{path}: '{k}' does not go with 'conversation'" for k in ("fields", "messages") if k in spec]
        problems += _check_conversation_spec(spec["conversation"], path)
    else:
        problems += [
            f"{path}: missing key '{k}' (or use 'conversation' for rows that hold messages)"
            for k in ("fields", "messages")
            if k not in spec
        ]
        if not problems:
            problems += _check_fields_and_messages(spec, path)
    if problems:
        return problems
    try:
        _JINJA.parse(spec["chat_template"])
    except TemplateError as err:
        problems.append(f"{path}: chat_template is not valid Jinja: {err}")
    if "eos_token" not in spec["chat_template"]:
        problems.append(f"{path}: chat_template never emits {{{{ eos_token }}}}: the model would not learn to stop")
    return problems


def _check_fields_and_messages(spec: dict, path: Path) -> list[str]:
    fields, messages = spec["fields"], spec["messages"]
    if not isinstance(fields, dict) or not fields:
        return [f"{path}: 'fields' maps each row field to required or optional"]
    problems = [
        f"{path}: fields.{k} is '{v}'; use required or optional"
        for k, v in fields.items()
        if v not in ("required", "optional")
    ]
    if not isinstance(messages, list) or not messages:
        return [
            *problems,
            f"{path}: 'messages' is a list of {{role, content}} messages, the last one an assistant message",
        ]
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            problems.append(f"{path}: messages[{i}] needs 'role' and 'content'")
            continue
        if message["role"] not in ROLES:
            problems.append(f"{path}: messages[{i}].role is '{message['role']}'; use one of {', '.join(ROLES)}")
        for key, text in message.items():
            try:
                _JINJA.parse(str(text))
            except TemplateError as err:
                problems.append(f"{path}: messages[{i}].{key} is not valid Jinja: {err}")
    if not problems and messages[-1]["role"] != "assistant":
        problems.append(
            f"{path}: the last of 'messages' must have role assistant (it is what the model learns to write)"
        )
    return problems


def _check_conversation_spec(conv, path: Path) -> list[str]:
    if not isinstance(conv, dict):
        return [f"{path}: 'conversation' is a mapping with keys {', '.join(CONVERSATION_KEYS)}"]
    problems = [f"{path}: conversation.{k} is missing" for k in CONVERSATION_KEYS if k not in conv]
    problems += [
        f"{path}: conversation.{k} is not a known key (allowed: {', '.join(CONVERSATION_KEYS)})"
        for k in conv
        if k not in CONVERSATION_KEYS
    ]
    roles = conv.get("roles")
    if isinstance(roles, dict):
        problems += [
            f"{path}: conversation.roles.{k} maps to '{v}'; use one of {', '.join(ROLES)}"
            for k, v in roles.items()
            if v not in ROLES
        ]
        if "assistant" not in roles.values() or "user" not in roles.values():
            problems.append(f"{path}: conversation.roles must map some role to user and some to assistant")
    elif "roles" in conv:
        problems.append(f"{path}: conversation.roles maps the data's role names to system, user or assistant")
    return problems
