"""OpenAI's API as `finetune serve` speaks it: request bodies (validated strictly: a number in quotes is a wrong type,
not a number), errors in OpenAI's shape ({"error": {message, type, param, code}}), and the answers, whole or as
server-sent events (chunks, then `data: [DONE]`). The app that serves them is finetune.inference.serve_app.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_STOP = 4  # OpenAI's limit on stop sequences
# Fields that would change the output in ways this server does not implement: accepted only at their no-op values,
# refused otherwise (silently ignoring logit_bias or tools would return something the client did not ask for).
NO_OP_VALUES = {
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "tools": (None, []),
    "tool_choice": (None, "none", "auto"),
    "functions": (None, []),
    "response_format": (None, {"type": "text"}),
    "echo": (None, False),
    "suffix": (None, ""),
    "best_of": (None, 1),
}


# -- request bodies -----------------------------------------------------------------------------------------------


class _Strict(BaseModel):
    # strict: "5" is not a number and "yes" is not a boolean; extra: clients send fields we do not use (user, metadata)
    model_config = ConfigDict(strict=True, extra="allow")


class StreamOptions(_Strict):
    include_usage: bool = False


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    """A chat message; fields besides role and content (alpaca's `input`) reach the chat template as given."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def for_template(self) -> dict:
        content = self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)
        return {
            **(self.model_extra or {}),
            "role": "system" if self.role == "developer" else self.role,
            "content": content,
        }


class Sampling(_Strict):
    """The fields both generation endpoints share."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)  # OpenAI's default; 0 is greedy
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1)
    seed: int | None = None  # choice i samples with seed + i
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None


class ChatCompletionRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens; wins when both are given


class CompletionRequest(Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]  # text, texts, token ids, lists of token ids


# -- errors -------------------------------------------------------------------------------------------------------


class APIError(Exception):
    """An answer in OpenAI's error shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, **options):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = options.get("type") or ("server_error" if status >= 500 else "invalid_request_error")
        self.headers = options.get("headers")

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def parse(kind: type[BaseModel], raw: bytes) -> BaseModel:
    """The request body as `kind`, whatever its Content-Type (curl -d sends form encoding); a 400 naming each bad field
    (`messages.0.content: Input should be a valid string`), or saying the JSON is malformed."""
    try:
        return kind.model_validate_json(raw or b"null")
    except ValidationError as error:
        problems, params = [], []
        for problem in error.errors(include_url=False):
            if problem["type"] == "json_invalid":
                raise APIError(400, f"malformed JSON: {problem['msg'].removeprefix('Invalid JSON: ')}") from None
            param = ".".join(str(part) for part in problem["loc"]) or "body"
            params.append(param)
            problems.append(f"{param}: {problem['msg']}")
        raise APIError(400, "; ".join(problems), params[0], "invalid_value") from None


# -- responses ---------------------------------------------------------------------------------------------------


@dataclass
class Reply:
    """The envelope of one answer: a chat completion or a text completion, whole or as stream chunks."""

    kind: str  # "chat" | "completion"
    model: str
    include_usage: bool = False
    created: int = field(default_factory=lambda: int(time.time()))
    id: str = ""

    def __post_init__(self):
        self.id = f"{'chatcmpl' if self.kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"

    def _envelope(self, stream: bool, choices: list[dict]) -> dict:
        kind = ("chat.completion.chunk" if stream else "chat.completion") if self.kind == "chat" else "text_completion"
        body = {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}
        return body | ({"system_fingerprint": None} if self.kind == "chat" else {})

    def whole(self, choices: list[tuple[str, str]], usage: dict) -> dict:
        """The non-streaming answer: (text, finish_reason) per choice index."""
        if self.kind == "chat":
            rows = [
                {"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": end}
                for i, (text, end) in enumerate(choices)
            ]
        else:
            rows = [
                {"index": i, "text": text, "logprobs": None, "finish_reason": end}
                for i, (text, end) in enumerate(choices)
            ]
        return self._envelope(False, rows) | {"usage": usage}

    def chunk(self, index: int, text: str | None = None, finish: str | None = None, first: bool = False) -> str:
        """One server-sent event for choice `index`: its role (chat, first), new text, or finish_reason."""
        if self.kind == "chat":
            delta = {"role": "assistant", "content": ""} if first else {"content": text} if text is not None else {}
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
        return event(self._envelope(True, [choice]) | ({"usage": None} if self.include_usage else {}))

    def usage_chunk(self, usage: dict) -> str:
        return event(self._envelope(True, []) | {"usage": usage})


def event(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def check_no_ops(body: Sampling) -> None:
    for name, allowed in NO_OP_VALUES.items():
        if (body.model_extra or {}).get(name) not in allowed:
            raise APIError(
                400, f"{name} is not supported by finetune serve (leave it out)", name, "unsupported_parameter"
            )


def stops(stop: str | list[str] | None) -> tuple[str, ...]:
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if len(stops) > MAX_STOP:
        raise APIError(400, f"stop: at most {MAX_STOP} stop sequences (got {len(stops)})", "stop", "invalid_value")
    return stops
