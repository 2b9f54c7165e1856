"""An Ollama Modelfile beside a GGUF export, whose TEMPLATE writes prompts exactly as training rendered them.

Ollama does not run the Jinja chat template saved with the tokenizer; it fills a Go template with `.System` and
`.Prompt`. The Go template is derived by rendering the training chat template (transformers' own renderer, so
trim_blocks/lstrip_blocks and the sandbox are those of training) around sentinel contents for one user turn with
add_generation_prompt=True, then putting Ollama's variables where the sentinels landed; a system message becomes an
`{{ if .System }}` block where the template renders one.
"""

from __future__ import annotations

from pathlib import Path

_PROMPT = "PROMPT7f3a9c2e"  # sentinels: plain ASCII so that no template filter or escape alters them
_SYSTEM = "SYSTEM7f3a9c2e"
_CHATML = ("<|im_end|>", "<|im_start|>")


def write(
    out_dir: Path,
    gguf_name: str,
    chat_template: str | None,
    eos_token: str,
    template_name: str | None,
    parameters: dict | None = None,
) -> Path:
    """Write `out_dir`/Modelfile for the GGUF file `gguf_name` beside it; `template_name` is the run's data template
    (a name or path, as finetune.data.templates.load takes it), None when unknown.

    A data template without a user message (completion: continued pretraining) is continued as raw text, as
    generate does, so its TEMPLATE is the prompt itself.
    """
    raw = template_name is not None and _is_raw(template_name)
    template, stops = go_template(None if raw else chat_template, eos_token)
    if '"""' in template:
        raise ValueError('the chat template renders """, which ends an Ollama TEMPLATE block')
    for value in stops:
        if '"' in value or "\n" in value:
            raise ValueError(f"stop string {value!r}: a quote or newline cannot be written as an Ollama PARAMETER")
    label = f"the {template_name} data template" if template_name else "the chat template" if chat_template else "raw"
    lines = [
        f"# Ollama Modelfile for {gguf_name}: prompts are written as in training ({label}).",
        "# In this folder: ollama create NAME -f Modelfile",
        f"FROM ./{gguf_name}",
        f'TEMPLATE """{template}"""',
        *(f'PARAMETER stop "{value}"' for value in stops),
    ]
    for key, value in (parameters or {}).items():
        lines += [f"PARAMETER {key} {v}" for v in (value if isinstance(value, (list, tuple)) else [value])]
    path = Path(out_dir) / "Modelfile"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def go_template(chat_template: str | None, eos_token: str) -> tuple[str, list[str]]:
    """Ollama's TEMPLATE text and stop strings for `chat_template` (None: raw completion, the prompt as is).

    Stops: EOS (every trained response ends with it) and, for ChatML-style templates, the turn markers, in case
    a model starts a new turn instead.
    """
    stops = [eos_token]
    if chat_template and _CHATML[1] in chat_template:
        stops += [s for s in _CHATML if s != eos_token]
    if chat_template is None:
        return "{{ .Prompt }}", stops
    user = {"role": "user", "content": _PROMPT}
    without = _render(chat_template, eos_token, [user])
    if without.count(_PROMPT) != 1:
        raise ValueError(f"the chat template renders the user's message {without.count(_PROMPT)} times, not once")
    try:
        with_system = _render(chat_template, eos_token, [{"role": "system", "content": _SYSTEM}, user])
    except Exception:  # a template that refuses a system message (raise_exception, a role check) has none
        with_system = None
    if with_system is None or with_system.count(_SYSTEM) != 1 or with_system.count(_PROMPT) != 1:
        return _go(without), stops
    start, end = _difference(with_system, without)
    head, tail = without[:start], without[len(without) - end :]
    block, other = with_system[start : len(with_system) - end], without[start : len(without) - end]
    if _SYSTEM not in block:
        raise ValueError("the chat template's system message is not one block that Ollama's {{ if .System }} can hold")
    otherwise = "{{ else }}" + _go(other) if other else ""
    text = _go(head) + "{{ if .System }}" + _go(block) + otherwise + "{{ end }}" + _go(tail)
    return text, stops


def _difference(with_system: str, without: str) -> tuple[int, int]:
    """(start, length of the common tail) of the part in which the two renderings differ. When the system
    message only adds text, the added block is moved as early as it can go (ChatML: the whole system turn, not a
    split `system ... <|im_start|>` that happens to fit too)."""
    start = 0
    while start < min(len(with_system), len(without)) and with_system[start] == without[start]:
        start += 1
    end = 0
    while end < min(len(with_system), len(without)) - start and with_system[-1 - end] == without[-1 - end]:
        end += 1
    if start + end == len(without):  # pure insertion: the earliest place it fits
        added = len(with_system) - len(without)
        start = next(p for p in range(start + 1) if with_system[:p] + with_system[p + added :] == without)
        end = len(without) - start
    return start, end


def _go(text: str) -> str:
    """Rendered text as Go template text: a literal `{{` is escaped, the sentinels become Ollama's variables."""
    text = text.replace("{{", '{{ "{{" }}')
    return text.replace(_PROMPT, "{{ .Prompt }}").replace(_SYSTEM, "{{ .System }}")


def _render(chat_template: str, eos_token: str, messages: list[dict]) -> str:
    """The prompt as training's tokenizer.apply_chat_template(..., add_generation_prompt=True) renders it."""
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(
        conversations=[messages], chat_template=chat_template, add_generation_prompt=True, eos_token=eos_token
    )
    return rendered[0]


def _is_raw(template_name: str) -> bool:
    """Whether the data template continues text as is (no user message, like `completion`)."""
    from finetune.data import templates

    template = templates.load(template_name)
    return not template.conversation_spec and not any(m.get("role") == "user" for m in template.messages)
