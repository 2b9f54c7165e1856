"""Continuous batching for `finetune serve`: requests for different adapters decode together, one token per step.

Why not `model.generate`: one call has one generation config and one adapter, and its batch starts and ends
together, so a request that arrives while another decodes waits for all of it. Here a request joins the running
batch at the next step (its prompt prefilled, its KV cache left-padded to the batch's length and stacked under the
others), leaves the step it ends (EOS, a stop string, max_tokens, its client gone), and carries its own adapter
(peft's mixed-adapter batches: `adapter_names`, "__base__" for the base), temperature, top_p and seed.

Correct for these families by construction: rows are left-padded, so each row's real tokens sit contiguously at the
right end of the cache; every forward gets each row's own position_ids (GPT-Neo's learned positions and the rotary
models all read them; left to itself GPT-Neo counts cache slots, padding included); GPT-Neo's local window is a band
over cache indices, which between real tokens of one row are the same distances as unpadded. Columns that are
padding for every row are dropped when rows leave, so the cache never outgrows the longest live row. Greedy output
equals `finetune generate` token for token (tests/test_serve_engine.py), and a seeded sample does not depend on
what else is in the batch: each row draws from its own generator.

The engine runs on one thread (`start`); `submit` is thread-safe and never blocks: a full queue raises QueueFull,
so memory stays bounded whatever the clients do. Updates go to each request's `emit`, called on the engine thread.
"""

from __future__ import annotations

import queue
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers import DynamicCache

BASE = "__base__"  # peft's name for "no adapter" in a mixed batch


class QueueFull(Exception):
    """The engine's queue is full: retry later (HTTP 429)."""


class Closed(Exception):
    """The engine is shutting down and takes no new requests (HTTP 503)."""


@dataclass(frozen=True)
class Update:
    """What a request produced since its last update; `finish_reason` is set on its last one."""

    text: str
    completion_tokens: int  # generated so far, the EOS token included
    finish_reason: str | None = None  # "stop" (EOS or a stop string), "length", "cancelled" or "error"
    error: str | None = None


@dataclass
class Request:
    """One sequence to generate. `prompt_ids` are already rendered and tokenized; the server checks lengths."""

    prompt_ids: list[int]
    max_tokens: int
    emit: Callable[[Update], None]
    adapter: str = BASE
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = True  # False: one update when it ends (no per-token traffic to the server's event loop)
    cancelled: threading.Event = field(default_factory=threading.Event)  # set by the server: the client has gone


@dataclass
class _Row:
    """A request in the batch: what it generated, what it has sent, the token it feeds next."""

    request: Request
    generator: torch.Generator | None
    position: int  # the position id of the next token fed
    generated: list[int] = field(default_factory=list)
    sent: int = 0  # characters of the text already emitted
    text: str = ""  # the decoded text of generated[:read]
    prefix: int = 0  # generated[prefix:read] is decoded again with the new tokens, for the context a decoder needs
    read: int = 0


class Engine:
    """One model (a base with its adapters, or full weights) serving many requests through one batch."""

    def __init__(self, model, tokenizer, *, max_batch: int = 16, max_queue: int = 64, context: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.context = context or getattr(model.config, "max_position_embeddings", None) or 2048
        self.eos = tokenizer.eos_token_id
        self.pad = next((t for t in (tokenizer.pad_token_id, self.eos) if t is not None), 0)  # never attended to
        self.mixed = hasattr(model, "peft_config")  # a PeftModel: adapter_names selects each row's adapter
        self.adapters = set(model.peft_config) if self.mixed else set()
        self._active = model.active_adapter if self.mixed else None
        self._names: list[str] | None = None  # each row's adapter, for the LoRA layers during a mixed forward
        self._hooks = _adapter_hooks(model, self) if self.mixed else []
        self._pending: queue.Queue[Request] = queue.Queue(maxsize=max_queue)
        self._rows: list[_Row] = []
        self._cache = None
        self._mask: torch.Tensor | None = None  # (rows, cache length): 1 real token, 0 padding
        self._next: torch.Tensor | None = None  # (rows,): each row's last sampled token, not yet in the cache
        self._closed = threading.Event()
        self._submitting = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.steps = 0  # forward passes, for /metrics and tests

    # -- the server's side (any thread) --------------------------------------------------------------------------

    def submit(self, *requests: Request) -> None:
        """Queue all of `requests` or none (one HTTP request's n choices): QueueFull when they do not all fit,
        Closed while shutting down, ValueError for an adapter this model does not have."""
        if self._closed.is_set():
            raise Closed("the server is shutting down")
        for request in requests:
            if request.adapter != BASE and request.adapter not in self.adapters:
                raise ValueError(f"no adapter {request.adapter!r} in this model")
        with self._submitting:  # only this lock adds to the queue, so the room checked is still there when used
            room = self._pending.maxsize - self._pending.qsize()
            if len(requests) > room:
                raise QueueFull(f"{self._pending.qsize()} of {self._pending.maxsize} queue places are taken")
            for request in requests:
                self._pending.put_nowait(request)

    @property
    def queue_depth(self) -> int:
        return self._pending.qsize()

    @property
    def running(self) -> int:
        return len(self._rows)

    @property
    def alive(self) -> bool:
        """The engine thread is running (for /health: a dead engine answers nothing)."""
        return self._alive() and not self._stop.is_set()

    def start(self) -> Engine:
        """Run the engine on a thread of its own (a no-op for an engine made by `spawn`, already running)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="finetune-serve-engine", daemon=True)
            self._thread.start()
        return self

    @classmethod
    def spawn(cls, build: Callable[[], Engine]) -> Engine:
        """`build()` (load the model, make its Engine) and run the engine, both on one new thread; what build raises
        is raised here. Why: torch's CPU kernels keep a pool of OpenMP threads per calling thread, and a model loaded
        on one thread and run on another had two pools competing for the cores: 2.6x slower decoding on 2 cores
        (benchmarks/RESULTS.md, serve)."""
        built, ready = {}, threading.Event()

        def main():
            try:
                engine = build()
            except BaseException as error:  # noqa: BLE001 - handed to the caller, raised there
                built["error"] = error
                ready.set()
                return
            engine._thread = threading.current_thread()
            built["engine"] = engine
            ready.set()
            engine._loop()

        threading.Thread(target=main, name="finetune-serve-engine", daemon=True).start()
        ready.wait()
        if "error" in built:
            raise built["error"]
        return built["engine"]

    def close(self, timeout: float = 30.0) -> None:
        """Take no new requests, let the queued and running ones finish for up to `timeout` s, cancel the rest."""
        self._closed.set()
        deadline = time.monotonic() + timeout
        while (self._rows or not self._pending.empty()) and time.monotonic() < deadline and self._alive():
            time.sleep(0.01)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, timeout))
        self._cancel_all("cancelled")
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def _alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- the engine thread ---------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                admitted = self._admit()  # at most one prefill per step: decoding never waits for a stream of arrivals
                if self._rows:
                    self._step()
                elif not admitted:
                    time.sleep(0.002)
            except Exception as error:  # noqa: BLE001 - a failed forward fails its requests, not the server
                self._cancel_all("error", f"{type(error).__name__}: {error}")
                if isinstance(error, torch.OutOfMemoryError) and torch.cuda.is_available():
                    torch.cuda.empty_cache()

    def _take(self) -> list[Request]:
        """Queued requests for the free rows, the cancelled ones answered and dropped."""
        taken = []
        while len(self._rows) + len(taken) < self.max_batch:
            try:
                request = self._pending.get_nowait()
            except queue.Empty:
                break
            if request.cancelled.is_set():
                _send(request, Update("", 0, "cancelled"))
            else:
                taken.append(request)
        return taken

    @torch.no_grad()
    def _admit(self) -> bool:
        """Prefill the waiting requests together and add them to the batch (each row's first token sampled)."""
        requests = self._take()
        if not requests:
            return False
        device = self.model.device
        width = max(len(r.prompt_ids) for r in requests)
        ids = torch.tensor([[self.pad] * (width - len(r.prompt_ids)) + r.prompt_ids for r in requests], device=device)
        mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in requests])
        mask = mask.to(device)
        cache = DynamicCache()
        try:
            logits = self._forward(ids, mask, _positions(mask), cache, [r.adapter for r in requests])
        except Exception as error:  # noqa: BLE001 - these requests are in no row yet: answer them here
            for request in requests:
                _send(request, Update("", 0, "error", f"{type(error).__name__}: {error}"))
            raise
        rows = [_Row(r, _generator(r), len(r.prompt_ids)) for r in requests]
        self._join(rows, cache, mask)
        first = self._sample(logits, rows)
        self._next = first if self._next is None else torch.cat([self._next, first])
        self._advance(len(self._rows) - len(rows))
        return True

    @torch.no_grad()
    def _step(self) -> None:
        """One token for every row: feed each row's last token, sample the next."""
        self._mask = torch.cat([self._mask, self._mask.new_ones(len(self._rows), 1)], dim=1)
        positions = torch.tensor([[row.position] for row in self._rows], device=self._mask.device)
        logits = self._forward(
            self._next[:, None], self._mask, positions, self._cache, [r.request.adapter for r in self._rows]
        )
        for row in self._rows:
            row.position += 1
        self._next = self._sample(logits, self._rows)
        self._advance(0)

    def _forward(self, ids, mask, positions, cache, adapters: list[str]) -> torch.Tensor:
        """Logits of each row's last position. Rows of one adapter run it as the active adapter (peft's plain LoRA
        forward); mixed rows go through peft's mixed-batch forward, `adapter_names` handed to the LoRA layers by
        hooks registered once (peft's own `adapter_names=` argument registers and removes a hook on every LoRA layer
        at every call: a quarter of a tiny model's decoding step)."""
        if self.mixed:
            if len(set(adapters)) == 1 and adapters[0] != BASE:
                if self._active != adapters[0]:
                    self.model.set_adapter(adapters[0])
                    self._active = adapters[0]
            else:
                self._names = adapters
        try:
            out = self.model(
                input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                logits_to_keep=1,
            )  # fmt: skip
        finally:
            self._names = None
        self.steps += 1
        return out.logits[:, -1, :].float()

    def _join(self, rows: list[_Row], cache, mask: torch.Tensor) -> None:
        """Stack the new rows' cache and mask under the batch's, left-padding the shorter to the longer."""
        if not self._rows:
            self._rows, self._cache, self._mask = rows, cache, mask
            return
        old, new = self._mask.shape[1], mask.shape[1]
        for mine, theirs in zip(self._cache.layers, cache.layers):
            mine.keys = torch.cat([_left_pad(mine.keys, new - old), _left_pad(theirs.keys, old - new)])
            mine.values = torch.cat([_left_pad(mine.values, new - old), _left_pad(theirs.values, old - new)])
        self._mask = torch.cat([_left_pad(self._mask, new - old, dim=1), _left_pad(mask, old - new, dim=1)])
        self._rows = self._rows + rows

    def _sample(self, logits: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
        """Each row's next token: argmax where greedy, else drawn at its temperature and top_p from its generator."""
        tokens = logits.argmax(dim=-1)
        for i, row in enumerate(rows):
            request = row.request
            if request.temperature > 0:
                probs = torch.softmax(logits[i].cpu() / request.temperature, dim=-1)
                if request.top_p < 1:
                    probs = _top_p(probs, request.top_p)
                tokens[i] = torch.multinomial(probs, 1, generator=row.generator).item()
        return tokens

    def _advance(self, start: int) -> None:
        """Record the tokens just sampled for rows[start:], emit their new text, and drop the rows that ended."""
        keep = list(range(start))
        for i in range(start, len(self._rows)):
            row = self._rows[i]
            if row.request.cancelled.is_set():
                _send(row.request, Update("", len(row.generated), "cancelled"))
                continue
            token = int(self._next[i])
            row.generated.append(token)
            if self._emit(row, token):
                keep.append(i)
        for i in range(start):  # rows not sampled this call (admission) may still have lost their client
            if self._rows[i].request.cancelled.is_set():
                _send(self._rows[i].request, Update("", len(self._rows[i].generated), "cancelled"))
                keep.remove(i)
        if len(keep) < len(self._rows):
            self._select(keep)

    def _emit(self, row: _Row, token: int) -> bool:
        """Send the row's new text; False when the row has ended (and its last update is sent)."""
        request = row.request
        text = self._text(row)
        finish = None
        if token == self.eos:
            finish = "stop"
        cut = _first_stop(text, request.stop, row.sent)
        if cut is not None:
            text, finish = text[:cut], "stop"
        elif finish is None and (len(row.generated) >= request.max_tokens or row.position + 1 >= self.context):
            finish = "length"
        if finish is None:
            if not request.stream:
                return True
            hold = max((len(s) for s in request.stop), default=1) - 1  # a stop string may be starting
            safe = len(text) - hold
            while safe > row.sent and text[safe - 1] == "\ufffd":  # half of a multi-byte character
                safe -= 1
            if safe > row.sent:
                _send(request, Update(text[row.sent : safe], len(row.generated)))
                row.sent = safe
            return True
        _send(request, Update(text[row.sent :], len(row.generated), finish))
        return False

    def _text(self, row: _Row) -> str:
        """The row's whole text, decoding only its newest tokens (the offsets TGI and vLLM use): decoding everything
        at every step costs the square of the length (0.3 ms a row a step at 1,024 tokens). The text is kept only up
        to a complete character; a token that ends inside one is decoded again with the next."""
        before = self.tokenizer.decode(row.generated[row.prefix : row.read], skip_special_tokens=True)
        after = self.tokenizer.decode(row.generated[row.prefix :], skip_special_tokens=True)
        text = row.text + after[len(before) :]
        if not after.endswith("\ufffd"):
            row.text, row.prefix, row.read = text, row.read, len(row.generated)
        return text

    def _select(self, keep: list[int]) -> None:
        """Keep only rows `keep`, then drop the leading columns that are padding for all of them."""
        if not keep:
            self._rows, self._cache, self._mask, self._next = [], None, None, None
            return
        index = torch.tensor(keep, device=self._mask.device)
        self._rows = [self._rows[i] for i in keep]
        self._mask, self._next = self._mask[index], self._next[index]
        live = self._mask.any(dim=0).nonzero()
        first = int(live[0]) if len(live) else 0
        for layer in self._cache.layers:
            layer.keys, layer.values = layer.keys[index, :, first:], layer.values[index, :, first:]
        self._mask = self._mask[:, first:]

    def _cancel_all(self, reason: str, error: str | None = None) -> None:
        """End every running and queued request with `reason` (a failed step, or shutdown)."""
        for row in self._rows:
            _send(row.request, Update("", len(row.generated), reason, error))
        self._rows, self._cache, self._mask, self._next = [], None, None, None
        while True:
            try:
                request = self._pending.get_nowait()
            except queue.Empty:
                return
            _send(request, Update("", 0, reason, error))


def _adapter_hooks(model, engine: Engine) -> list:
    """A forward pre-hook on every LoRA layer that passes the engine's row adapters (`adapter_names`) while the
    engine runs a mixed batch, and nothing otherwise: what peft's `adapter_names=` does, registered once."""
    from peft.tuners.lora import LoraLayer

    def hook(module, args, kwargs):
        if engine._names is not None:
            kwargs["adapter_names"] = engine._names
            return args, kwargs
        return None

    return [m.register_forward_pre_hook(hook, with_kwargs=True) for m in model.modules() if isinstance(m, LoraLayer)]


def _send(request: Request, update: Update) -> None:
    """Hand `update` to the request's callback; a callback that fails (its event loop closed at shutdown) is the
    server's problem, and must not stop the engine serving the others."""
    try:
        request.emit(update)
    except Exception:  # noqa: BLE001
        request.cancelled.set()


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Each token's position within its own row (padding: 0), from a left-padded mask."""
    return (mask.cumsum(dim=1) - 1).clamp(min=0)


def _left_pad(tensor: torch.Tensor, count: int, dim: int = 2) -> torch.Tensor:
    """`tensor` with `count` zeros before it along `dim` (cache tensors: their sequence dim; masks: dim 1)."""
    if count <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = count
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def _generator(request: Request) -> torch.Generator | None:
    """The row's own random stream: its seed, or a fresh one; none for greedy rows."""
    if request.temperature <= 0:
        return None
    seed = request.seed if request.seed is not None else random.SystemRandom().randrange(2**63)
    return torch.Generator().manual_seed(seed)


def _top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """The smallest set of most likely tokens whose probability reaches top_p (at least one), renormalised."""
    ordered, order = probs.sort(descending=True)
    outside = ordered.cumsum(dim=-1) - ordered >= top_p
    ordered[outside] = 0
    kept = torch.zeros_like(probs).scatter(0, order, ordered)
    return kept / kept.sum()


def _first_stop(text: str, stops: tuple[str, ...], sent: int) -> int | None:
    """Where the first stop string starts in `text` (searching from just before what was sent), or None."""
    if not stops:
        return None
    start = max(0, sent - max(len(s) for s in stops))
    hits = [i for i in (text.find(s, start) for s in stops if s) if i >= 0]
    return min(hits) if hits else None
