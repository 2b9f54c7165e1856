"""The FastAPI app of `finetune serve`: each request's prompt rendered and tokenized, put on its model's batching engine
(finetune.inference.batching) as n engine requests, and answered whole or streamed (the API's shapes:
finetune.inference.openai_api).

Endpoints: GET /v1/models, POST /v1/chat/completions, POST /v1/completions (`stream: true`: server-sent events, ending
with `data: [DONE]`), GET /health (never behind the key: load balancers probe it), GET /metrics (Prometheus text;
behind the key when there is one, as it names the models and their traffic).

Chat messages are rendered with the served model's own chat template, exactly as training rendered its data (a
template with extra user fields, such as alpaca's `input`, takes them from the message, "" when absent, as training
filled a missing field); /v1/completions continues the prompt text as it is. `max_tokens` left out means as many as
fit: the context minus the prompt, capped by the server's max_tokens_limit. Bodies are validated strictly (a number
in quotes is a wrong type, not a number) and every error has OpenAI's shape, {"error": {message, type, param, code}}.
The engine calls back on its own thread; updates cross to the event loop with call_soon_threadsafe.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from jinja2 import TemplateError
from starlette.exceptions import HTTPException

from finetune.errors import ConfigError
from finetune.inference import batching
from finetune.inference.openai_api import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    Message,
    Reply,
    Sampling,
    check_no_ops,
    event,
    parse,
    stops,
    usage,
)
from finetune.inference.prompting import Prompting
from finetune.inference.serve_metrics import Metrics

log = logging.getLogger("finetune.serve")
GENERATION = ("/v1/chat/completions", "/v1/completions")
ENDPOINTS = (*GENERATION, "/v1/models")  # the paths counted in /metrics (a mistyped path would grow the label set)


@dataclass
class Served:
    """One name the server answers to: an adapter (or the base, or a full model) on an engine, and its prompting."""

    name: str
    engine: batching.Engine
    adapter: str  # the engine's adapter name; batching.BASE for the base or full weights
    tokenizer: object  # the event loop's own copy: the engine decodes with its tokenizer on its thread
    prompting: Prompting
    context: int  # the model's context window, in tokens
    parent: str | None = None  # an adapter's base, by its served name


@dataclass(frozen=True)
class Limits:
    """What the server allows one request, and its access and logging policy."""

    max_n: int = 4
    max_tokens_limit: int = 1024
    api_key: str | None = field(default=None, repr=False)  # never in a repr, a log line or an error
    log_prompts: bool = False


class _Disconnected(Exception):
    """The client of a non-streaming request went away before its answer."""


class _Job:
    """The engine requests behind one HTTP request (n choices for each prompt), their updates on this event loop."""

    def __init__(self, served: Served, prompts: list[list[int]], budgets: list[int], body: Sampling, stop: tuple):
        self.loop = asyncio.get_running_loop()
        self.updates: asyncio.Queue = asyncio.Queue()
        self.requests: list[batching.Request] = []
        self.prompts = prompts
        for ids, budget in zip(prompts, budgets):
            for choice in range(body.n):
                seed = None if body.seed is None else body.seed + choice
                index = len(self.requests)
                self.requests.append(
                    batching.Request(
                        ids,
                        budget,
                        self._emit(index),
                        served.adapter,
                        body.temperature,
                        body.top_p,
                        seed,
                        stop,
                        stream=body.stream,  # a whole answer needs no update per token
                    )
                )
        self._submit(served)
        self.texts, self.finish, self.tokens = [""] * len(self), [None] * len(self), [0] * len(self)

    def __len__(self) -> int:
        return len(self.requests)

    def _emit(self, index: int):
        def emit(update: batching.Update) -> None:  # on the engine thread
            try:
                self.loop.call_soon_threadsafe(self.updates.put_nowait, (index, update))
            except RuntimeError:  # the event loop has closed (the server stopped): nobody is waiting
                pass

        return emit

    def _submit(self, served: Served) -> None:
        """All the job's requests join the queue, or none do (no choice left running for a refused request)."""
        try:
            served.engine.submit(*self.requests)
        except batching.QueueFull as err:
            raise APIError(
                429, f"the server is busy ({err}); retry shortly", None, "queue_full", headers={"Retry-After": "1"}
            ) from None
        except batching.Closed:
            raise APIError(503, "the server is shutting down", None, "shutting_down") from None

    def cancel(self) -> None:
        """Ends every request of the job: the engine drops their rows at its next step (a no-op for finished ones)."""
        for request in self.requests:
            request.cancelled.set()

    async def updates_until_done(self, request: Request | None = None):
        """(choice index, update) until every choice has finished; with `request`, watch for its client leaving."""
        left = len(self)
        while left:
            try:
                index, update = await asyncio.wait_for(self.updates.get(), 1.0 if request else None)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    raise _Disconnected from None
                continue
            self.texts[index] += update.text
            self.tokens[index] = update.completion_tokens
            if update.finish_reason:
                self.finish[index] = update.finish_reason
                left -= 1
            yield index, update


def _failure(update: batching.Update) -> APIError | None:
    if update.finish_reason == "error":
        return APIError(500, f"generation failed: {update.error}", None, "generation_failed")
    if update.finish_reason == "cancelled":  # only the server cancels: it shut down before this request finished
        return APIError(503, "the server shut down before this request finished", None, "shutting_down")
    return None


class _API:
    """The endpoints over the served models; create_app routes to these methods."""

    def __init__(self, models: dict[str, Served], limits: Limits):
        self.models, self.limits = models, limits
        self.engines = {}  # by the base's served name (or the full model's): one per loaded model
        for served in models.values():
            self.engines.setdefault(served.parent or served.name, served.engine)
        self.metrics = Metrics(self.engines)
        self.closing = False
        self.started = int(time.time())

    async def authorize(self, request: Request) -> None:
        """Authorization: Bearer KEY, compared in constant time, when the server has a key."""
        if self.limits.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.limits.api_key.encode()):
            raise APIError(
                401,
                "missing or wrong API key: send the header Authorization: Bearer KEY",
                None,
                "invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    def lookup(self, name: str, request: Request) -> Served:
        served = self.models.get(name)
        if served is None:
            raise APIError(
                404, f"model {name!r} is not served here; served: {', '.join(self.models)}", "model", "model_not_found"
            )
        request.state.model = name
        return served

    def list_models(self) -> dict:
        return {
            "object": "list",
            "data": [
                {
                    "id": name,
                    "object": "model",
                    "created": self.started,
                    "owned_by": "finetune",
                    "root": served.parent or name,
                    "parent": served.parent,
                    "max_model_len": served.context,
                }
                for name, served in self.models.items()
            ],
        }

    async def chat(self, request: Request):
        body = parse(ChatCompletionRequest, await request.body())
        served = self.lookup(body.model, request)
        ids = _encode(served, _render(served, body.messages))
        newer = body.max_completion_tokens is not None
        max_tokens = body.max_completion_tokens if newer else body.max_tokens
        return await self.generate(request, "chat", served, [ids], body, max_tokens)

    async def completions(self, request: Request):
        body = parse(CompletionRequest, await request.body())
        served = self.lookup(body.model, request)
        return await self.generate(request, "completion", served, _prompts(served, body.prompt), body, body.max_tokens)

    async def generate(self, request, kind: str, served: Served, prompts: list[list[int]], body, max_tokens):
        started = time.monotonic()
        check_no_ops(body)
        budgets = self.budgets(served, prompts, body, max_tokens)
        job = _Job(served, prompts, budgets, body, stops(body.stop))
        reply = Reply(
            kind, served.name, bool(body.stream and body.stream_options and body.stream_options.include_usage)
        )
        prompt_tokens = sum(map(len, prompts))
        if body.stream:
            events = self.events(job, reply, prompt_tokens, started)
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            return StreamingResponse(events, media_type="text/event-stream", headers=headers)
        status = 499
        try:
            async for _, update in job.updates_until_done(request):
                if (failure := _failure(update)) is not None:
                    status = failure.status
                    raise failure
            status = 200
        except _Disconnected:
            return Response(status_code=499)
        finally:
            job.cancel()
            self.done(served.name, request.url.path, status, prompt_tokens, sum(job.tokens), started)
            self.log(served.name, job, status)
        return reply.whole(list(zip(job.texts, job.finish)), usage(prompt_tokens, sum(job.tokens)))

    async def events(self, job: _Job, reply: Reply, prompt_tokens: int, started: float):
        """The stream: role chunks (chat), text chunks as the engine sends them, each choice's finish, usage, [DONE]."""
        endpoint = GENERATION[0] if reply.kind == "chat" else GENERATION[1]
        status, first = 499, None  # 499 until the stream ends: a client that leaves cancels this generator
        try:
            for index in range(len(job) if reply.kind == "chat" else 0):
                yield reply.chunk(index, first=True)
            async for index, update in job.updates_until_done():
                if (failure := _failure(update)) is not None:
                    status = failure.status
                    yield event(json.loads(failure.response().body))
                    break
                if update.text:
                    first = first or time.monotonic()
                    yield reply.chunk(index, update.text)
                if update.finish_reason:
                    yield reply.chunk(index, finish=update.finish_reason)
            else:
                status = 200
                if reply.include_usage:
                    yield reply.usage_chunk(usage(prompt_tokens, sum(job.tokens)))
            yield event("[DONE]")
        finally:  # also when the client disconnects: the engine frees the rows at its next step
            job.cancel()
            if first is not None:
                self.metrics.first_token.labels(reply.model, endpoint).observe(first - started)
            self.done(reply.model, endpoint, status, prompt_tokens, sum(job.tokens), started)
            self.log(reply.model, job, status)

    def budgets(self, served: Served, prompts: list[list[int]], body: Sampling, max_tokens: int | None) -> list[int]:
        """max_tokens for each prompt (absent: what fits, up to max_tokens_limit); 400 past the server's limits or the
        model's context, with the numbers."""
        limits, n = self.limits, body.n
        chat = isinstance(body, ChatCompletionRequest)
        param = "max_completion_tokens" if chat and body.max_completion_tokens is not None else "max_tokens"
        if n > limits.max_n:
            raise APIError(
                400, f"n={n} is more than this server allows (max_n={limits.max_n})", "n", "too_many_choices"
            )
        if max_tokens is not None and max_tokens > limits.max_tokens_limit:
            raise APIError(
                400,
                f"{param}={max_tokens} is more than this server allows (max_tokens_limit={limits.max_tokens_limit})",
                param,
                "max_tokens_too_large",
            )
        budgets = []
        for ids in prompts:
            room = served.context - len(ids)
            if max_tokens is None and room < 1:
                raise APIError(
                    400,
                    f"the prompt is {len(ids)} tokens, which fills the model's context of {served.context} tokens: "
                    "shorten it",
                    "messages" if chat else "prompt",
                    "context_length_exceeded",
                )
            if max_tokens is not None and max_tokens > room:
                raise APIError(
                    400,
                    f"the prompt is {len(ids)} tokens and {param} is {max_tokens}: together {len(ids) + max_tokens}, "
                    f"more than the model's context of {served.context} tokens; shorten the prompt or lower {param}",
                    param,
                    "context_length_exceeded",
                )
            budgets.append(min(room, limits.max_tokens_limit) if max_tokens is None else max_tokens)
        return budgets

    def done(self, model: str, endpoint: str, status: int, prompt: int, completion: int, started: float) -> None:
        self.metrics.answered(model, endpoint, status)
        self.metrics.generated(model, endpoint, prompt, completion, time.monotonic() - started)

    def log(self, model: str, job: _Job, status: int) -> None:
        """Prompts and completions reach the log only with log_prompts=true (they may be private)."""
        if self.limits.log_prompts:
            shown = [self.models[model].tokenizer.decode(ids) for ids in job.prompts]
            log.info("%s %s prompt=%r completion=%r finish=%r", model, status, shown, job.texts, job.finish)

    def health(self) -> JSONResponse:
        engines = self.engines.values()
        body = {
            "status": "shutting down" if self.closing else "ok" if all(e.alive for e in engines) else "engine stopped",
            "models": list(self.models),
            "queue_depth": sum(e.queue_depth for e in engines),
            "running": sum(e.running for e in engines),
        }
        return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)


def _render(served: Served, messages: list[Message]) -> str:
    """The chat as training rendered it: the model's chat template, extra user fields "" when absent."""
    prompting = served.prompting
    if prompting.kind == "raw":
        raise APIError(
            400,
            f"{served.name} continues raw text ({prompting.label}, no chat template): POST /v1/completions with the "
            "prompt text instead",
            "model",
            "no_chat_template",
        )
    turns = [message.for_template() for message in messages]
    if any(turn["role"] == "system" for turn in turns) and prompting.kind not in ("conversation", "chat"):
        raise APIError(
            400, f"{served.name} ({prompting.label}) has no system message: drop it", "messages", "invalid_value"
        )
    for turn in turns:
        if turn["role"] == "user":
            turn.update({name: turn.get(name, "") for name in prompting.extra_fields})
    try:
        return prompting.text(served.tokenizer, turns)
    except ConfigError as err:
        raise APIError(400, f"{served.name}: {'; '.join(err.problems)}", "messages", "invalid_value") from None
    except TemplateError as err:
        raise APIError(400, f"{served.name}'s chat template refused the messages: {err}", "messages") from None


def _encode(served: Served, text: str) -> list[int]:
    return served.tokenizer(text, add_special_tokens=False)["input_ids"]  # the template wrote any special tokens


def _prompts(served: Served, prompt) -> list[list[int]]:
    """Token ids of each prompt: texts tokenized as they are, token ids checked against the vocabulary."""
    prompts = [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else prompt
    if not prompts or any(len(p) == 0 for p in prompts):
        raise APIError(400, "prompt: empty; give the text to continue", "prompt", "invalid_value")
    vocabulary = len(served.tokenizer)
    ids = [_encode(served, p) if isinstance(p, str) else p for p in prompts]
    if any(not 0 <= token < vocabulary for row in ids for token in row):
        raise APIError(400, f"prompt: token ids must be in [0, {vocabulary})", "prompt", "invalid_value")
    return ids


def create_app(models: dict[str, Served], limits: Limits) -> FastAPI:
    """The FastAPI app over `models` (by served name); its lifespan starts their engines and closes them at the end."""
    api = _API(models, limits)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        for engine in api.engines.values():
            engine.start()
        yield
        api.closing = True  # uvicorn has stopped taking connections and waited for those in flight (or cancelled them)
        await asyncio.gather(*(asyncio.to_thread(engine.close, 1.0) for engine in api.engines.values()))

    app = FastAPI(title="finetune serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.api = api
    key = [Depends(api.authorize)]

    async def answered(request: Request, error: Exception) -> JSONResponse:
        """Every error as OpenAI's error body, counted in /metrics."""
        if isinstance(error, HTTPException):  # no such path (404), wrong method (405)
            error = APIError(error.status_code, str(error.detail), headers=error.headers)
        if request.url.path in ENDPOINTS:
            api.metrics.answered(getattr(request.state, "model", ""), request.url.path, error.status)
        return error.response()

    for kind in (APIError, HTTPException):
        app.add_exception_handler(kind, answered)
    app.get("/v1/models", dependencies=key)(api.list_models)
    app.post("/v1/chat/completions", dependencies=key)(api.chat)
    app.post("/v1/completions", dependencies=key)(api.completions)
    app.get("/health")(api.health)
    app.get("/metrics", dependencies=key)(lambda: Response(api.metrics.render(), media_type=api.metrics.content_type))
    return app
