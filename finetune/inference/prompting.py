"""How prompts for one model are written (generate, chat, evaluate and the server render with it): the chat template
saved with the run's tokenizer and what its data template's messages allow, so the model sees the text layout it
learned."""

from __future__ import annotations

from dataclasses import dataclass

from finetune.errors import ConfigError


@dataclass(frozen=True)
class Prompting:
    """How prompts for one model are written: its chat template and what its data template's messages allow.

    kind: "conversation" (system message, multi-turn), "fields" (a user message with named extra fields, e.g.
    alpaca's input), "raw" (completion template or no chat template: text is continued as is), "chat" (a chat
    template without a known data template: messages are passed to it as given).
    """

    kind: str
    chat_template: str | None = None
    template: str | None = None  # the data template's name, for messages
    extra_fields: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        if self.template:
            return f"the {self.template} template"
        return "the tokenizer's chat template" if self.chat_template else "this model (no chat template)"

    def messages(self, prompt: str, system: str | None = None, input: str | None = None) -> list[dict]:
        """One user turn (with a system message first when given) as chat-template messages."""
        return self.start(system) + [self.user(prompt, input)]

    def start(self, system: str | None) -> list[dict]:
        """The messages a conversation starts with: the system message, where the template has one."""
        if system is None:
            return []
        if self.kind not in ("conversation", "chat"):
            raise ConfigError(
                f"system=: {self.label} has no system message; drop system= "
                "(conversation templates such as chatml and sharegpt have one)"
            )
        return [{"role": "system", "content": system}]

    def user(self, text: str, input: str | None = None) -> dict:
        """A user message; `input` fills the template's first extra field (alpaca: input, dolly: context)."""
        extra = self.extra_fields or (("input",) if self.kind == "chat" and input is not None else ())
        if input is not None and not extra:
            raise ConfigError(f"input=: {self.label} has no extra field in its user message; put the text into prompt=")
        message = {"role": "user", "content": text} | {
            name: "" for name in extra
        }  # "" as training rendered a missing field
        if input is not None:
            message[extra[0]] = input
        return message

    def text(
        self,
        tokenizer,
        prompt: str | list[dict],
        raw: bool = False,
        system: str | None = None,
        input: str | None = None,
    ) -> str:
        """The text the model continues: the rendered messages, or the prompt itself for raw prompts."""
        if isinstance(prompt, list):
            if raw or self.kind == "raw":
                raise ConfigError(
                    f"messages need a chat template and {self.label} continues raw text: give a prompt string"
                )
            return tokenizer.apply_chat_template(
                prompt, chat_template=self.chat_template, add_generation_prompt=True, tokenize=False
            )
        if raw or self.kind == "raw":
            if system is not None or input is not None:
                sender = "raw=true" if raw else self.label
                raise ConfigError(
                    f"system= and input= are rendered by a chat template, and {sender} sends the prompt "
                    "as is: drop them"
                )
            return prompt
        return self.text(tokenizer, self.messages(prompt, system, input))
