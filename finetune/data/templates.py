"""Data templates: how a row becomes a conversation, and how a conversation becomes text.

A template is a YAML file (see data_templates/README.md). Row fields are rendered into messages with a sandboxed
Jinja environment (a template is data, never code); messages are rendered to text by the tokenizer's own
`apply_chat_template` with the template's chat template, which is what inference will use too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml
from jinja2 import StrictUndefined, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from finetune.config import TEMPLATES_DIR
from finetune.errors import ConfigError

_JINJA = ImmutableSandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True)


@dataclass(frozen=True)
class Template:
    """A loaded, checked data template."""

    name: str
    path: Path
    required: tuple[str, ...]
    optional: tuple[str, ...]
    messages: tuple[dict, ...]
    chat_template: str

    def conversation(self, row: dict) -> list[dict]:
        """Render the row's fields into messages; missing optional fields render as empty strings."""
        values = {name: row.get(name) or "" for name in self.optional}
        values.update({name: row[name] for name in self.required})
        return [
            {key: _JINJA.from_string(text).render(values) if isinstance(text, str) else text for key, text in message.items()}
            for message in self.messages
        ]


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
        raise ConfigError(f"data.template: no template '{name_or_path}' ({path}); choose one of {available()} or give a YAML path")
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"data.template: {path} is not valid YAML: {err}") from err
    problems = _check(spec, path)
    if problems:
        raise ConfigError(problems)
    fields = spec["fields"]
    return Template(
        name=path.stem,
        path=path,
        required=tuple(k for k, v in fields.items() if v == "required"),
        optional=tuple(k for k, v in fields.items() if v == "optional"),
        messages=tuple(spec["messages"]),
        chat_template=spec["chat_template"],
    )


def _check(spec, path: Path) -> list[str]:
    if not isinstance(spec, dict):
        return [f"{path}: a template is a YAML mapping with fields, messages and chat_template"]
    problems = [f"{path}: missing key '{k}'" for k in ("fields", "messages", "chat_template") if k not in spec]
    unknown = set(spec) - {"description", "fields", "messages", "chat_template"}
    problems += [f"{path}: unknown key '{k}' (allowed: description, fields, messages, chat_template)" for k in sorted(unknown)]
    if problems:
        return problems
    fields = spec["fields"]
    if not isinstance(fields, dict) or not fields:
        return [f"{path}: 'fields' maps each row field to required or optional"]
    problems += [f"{path}: fields.{k} is '{v}'; use required or optional" for k, v in fields.items() if v not in ("required", "optional")]
    messages = spec["messages"]
    if not isinstance(messages, list) or len(messages) < 2:
        return [*problems, f"{path}: 'messages' needs at least a prompt message and the message to train on"]
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            problems.append(f"{path}: messages[{i}] needs 'role' and 'content'")
            continue
        for key, text in message.items():
            try:
                _JINJA.parse(str(text))
            except TemplateError as err:
                problems.append(f"{path}: messages[{i}].{key} is not valid Jinja: {err}")
    try:
        _JINJA.parse(spec["chat_template"])
    except TemplateError as err:
        problems.append(f"{path}: chat_template is not valid Jinja: {err}")
    if "eos_token" not in spec["chat_template"]:
        problems.append(f"{path}: chat_template never emits {{{{ eos_token }}}}: the model would not learn to stop")
    return problems
