"""finetune.inference.batching on tiny models of all three families: a batch of requests for different adapters,
joined while others decode, gives token for token what one `generate` per request gives (GPT-Neo's local window
and learned positions under left padding, the rotary models' positions); seeded samples do not depend on the batch;
stop strings, EOS, max_tokens, cancellation, a full queue, a failing request and shutdown each end as documented."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from finetune.inference import batching
from finetune.inference.batching import BASE, Engine, Request

PROMPTS = [
    "The court held that",
    "A tort is a civil wrong " * 6,  # longer than tiny GPT-Neo's 32-token local window, and padded under others
    "Patients with diabetes should",
    "x",
]
ADAPTERS = ["a", "b", BASE, "a"]
N = 12


@pytest.fixture(scope="module", params=["neo", "neox", "gptj"])
def model(request, tiny_models):
    """A tiny base with two random (non-zero) LoRA adapters, a and b: each changes the output."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.models import neo_attention

    folder = tiny_models[request.param]
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    neo_attention.enable(base)
    lora = dict(r=4, lora_alpha=8, init_lora_weights=False, target_modules="all-linear")
    peft_model = get_peft_model(base, LoraConfig(**lora), adapter_name="a")
    peft_model.add_adapter("b", LoraConfig(**lora))
    peft_model.eval()
    return peft_model, AutoTokenizer.from_pretrained(folder)


def one_at_a_time(peft_model, ids: list[int], adapter: str, max_new_tokens: int = N) -> list[int]:
    """What model.generate gives for this request alone (greedy, no EOS stop): the reference."""
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    if adapter == BASE:
        with peft_model.disable_adapter():
            out = peft_model.generate(torch.tensor([ids]), **kwargs)
    else:
        peft_model.set_adapter(adapter)
        out = peft_model.generate(torch.tensor([ids]), **kwargs)
    return out[0, len(ids) :].tolist()


class Collected:
    """A request's updates, gathered from the engine thread."""

    def __init__(self):
        self.updates: list[batching.Update] = []
        self.done = threading.Event()

    def __call__(self, update: batching.Update) -> None:
        self.updates.append(update)
        if update.finish_reason:
            self.done.set()

    @property
    def text(self) -> str:
        return "".join(u.text for u in self.updates)

    @property
    def last(self) -> batching.Update:
        assert self.done.wait(120), "the request never finished"
        return self.updates[-1]


def engine_for(model, eos: int | None = -1, **kwargs) -> Engine:
    engine = Engine(*model, **kwargs)
    engine.eos = eos  # -1: no token ends a row, so lengths match the EOS-free reference
    return engine.start()


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_a_mixed_adapter_batch_joined_mid_flight_equals_one_request_at_a_time(model):
    peft_model, tokenizer = model
    ids = [encode(tokenizer, p) for p in PROMPTS]
    want = [tokenizer.decode(one_at_a_time(peft_model, i, a), skip_special_tokens=True) for i, a in zip(ids, ADAPTERS)]
    engine = engine_for(model)
    try:
        got = [Collected() for _ in PROMPTS]
        for k in (0, 1):
            engine.submit(Request(ids[k], N, got[k], adapter=ADAPTERS[k]))
        while engine.steps < 4:  # the first two are decoding when the others arrive
            time.sleep(0.001)
        running = engine.running
        for k in (2, 3):
            engine.submit(Request(ids[k], N, got[k], adapter=ADAPTERS[k]))
        assert [g.last.finish_reason for g in got] == ["length"] * 4
        assert [g.text for g in got] == want
        assert [g.last.completion_tokens for g in got] == [N] * 4
        assert running == 2 and engine.steps < 2 * N + 4  # shared steps, not one pass per request
        assert engine.running == 0
    finally:
        engine.close(1)


def test_a_seeded_sample_does_not_depend_on_the_batch(model):
    peft_model, tokenizer = model
    engine = engine_for(model)
    try:
        alone = Collected()
        engine.submit(
            Request(encode(tokenizer, PROMPTS[0]), N, alone, adapter="b", temperature=1.0, top_p=0.9, seed=11)
        )
        alone.last
        together = [Collected() for _ in range(3)]
        for got, seed in zip(together, [11, 12, 11]):
            engine.submit(
                Request(encode(tokenizer, PROMPTS[0]), N, got, adapter="b", temperature=1.0, top_p=0.9, seed=seed)
            )
        assert [g.last.finish_reason for g in together] == ["length"] * 3
        assert together[0].text == together[2].text == alone.text  # same seed, same text, whatever the neighbours
        assert together[0].text != together[1].text
    finally:
        engine.close(1)


def test_stop_strings_eos_and_max_tokens_end_a_row(model):
    peft_model, tokenizer = model
    ids = encode(tokenizer, PROMPTS[2])
    reference = one_at_a_time(peft_model, ids, "a", 2 * N)
    text = tokenizer.decode(reference, skip_special_tokens=True)
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    engine = engine_for(model)
    try:
        stopped = Collected()
        engine.submit(Request(ids, 2 * N, stopped, adapter="a", stop=("never there", stop)))
        assert stopped.last.finish_reason == "stop"
        assert stopped.text == text[: text.index(stop)]  # the stop string itself is not sent
        short = Collected()
        engine.submit(Request(ids, 3, short, adapter="a"))
        assert (short.last.finish_reason, short.last.completion_tokens) == ("length", 3)
        engine.eos = reference[4]  # a token greedy decoding reaches: the row ends there, EOS counted
        ended = Collected()
        engine.submit(Request(ids, 2 * N, ended, adapter="a"))
        assert ended.last.finish_reason == "stop"
        assert ended.last.completion_tokens == reference.index(reference[4]) + 1
    finally:
        engine.close(1)


def test_a_row_ends_at_the_context_window(model):
    peft_model, tokenizer = model
    context = peft_model.config.max_position_embeddings
    ids = (encode(tokenizer, PROMPTS[1]) * context)[: context - 3]
    engine = engine_for(model)
    try:
        got = Collected()
        engine.submit(Request(ids, 50, got, adapter="a"))
        assert (got.last.finish_reason, got.last.completion_tokens) == ("length", 3)  # positions context-3 .. -1
    finally:
        engine.close(1)


def test_a_cancelled_request_frees_its_row_and_the_others_finish(model):
    peft_model, tokenizer = model
    ids = encode(tokenizer, PROMPTS[0])
    want = tokenizer.decode(one_at_a_time(peft_model, ids, "b"), skip_special_tokens=True)
    engine = engine_for(model)
    try:
        long, other = Collected(), Collected()
        request = Request(ids, 400, long, adapter="a")
        engine.submit(request)
        engine.submit(Request(ids, N, other, adapter="b"))
        while engine.steps < 3:
            time.sleep(0.001)
        request.cancelled.set()  # the client went away
        assert long.last.finish_reason == "cancelled"
        assert long.last.completion_tokens < 400
        assert other.last.finish_reason == "length" and other.text == want
        deadline = time.monotonic() + 10
        while engine.running and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.running == 0
    finally:
        engine.close(1)


def test_a_full_queue_refuses_and_shutdown_answers_everyone(model):
    engine = Engine(*model, max_queue=2)  # not started: nothing leaves the queue
    waiting = [Collected(), Collected()]
    for got in waiting:
        engine.submit(Request([1, 2, 3], N, got))
    with pytest.raises(batching.QueueFull):
        engine.submit(Request([1, 2, 3], N, Collected()))
    with pytest.raises(ValueError, match="no adapter 'c'"):
        Engine(*model).submit(Request([1], N, Collected(), adapter="c"))
    engine.close(0)
    assert [g.last.finish_reason for g in waiting] == ["cancelled", "cancelled"]
    with pytest.raises(batching.Closed):
        engine.submit(Request([1, 2, 3], N, Collected()))


def test_a_failing_request_gets_an_error_and_the_engine_keeps_serving(model):
    peft_model, tokenizer = model
    engine = engine_for(model)
    try:
        bad = Collected()
        engine.submit(Request([peft_model.config.vocab_size + 5], N, bad, adapter="a"))  # not a token of this model
        assert bad.last.finish_reason == "error" and "IndexError" in bad.last.error
        good = Collected()
        engine.submit(Request(encode(tokenizer, PROMPTS[0]), N, good, adapter="a"))
        assert good.last.finish_reason == "length" and good.last.completion_tokens == N
    finally:
        engine.close(1)


def test_a_callback_that_raises_does_not_stop_the_engine(model):
    peft_model, tokenizer = model
    engine = engine_for(model)

    def gone(update):
        raise RuntimeError("Event loop is closed")  # what call_soon_threadsafe raises after the server's loop ended

    try:
        request = Request(encode(tokenizer, PROMPTS[0]), N, gone, adapter="a")
        engine.submit(request)
        good = Collected()
        engine.submit(Request(encode(tokenizer, PROMPTS[2]), N, good, adapter="b"))
        assert good.last.finish_reason == "length" and good.last.completion_tokens == N
        assert request.cancelled.is_set()  # its row was dropped, not decoded to the end for nobody
    finally:
        engine.close(1)


def test_incremental_decoding_equals_decoding_the_whole_text(model):
    """Random token streams (split multi-byte characters and invalid bytes included): the text the engine builds a
    token at a time is the whole decode, and each prefix it reports is a prefix of it."""
    import random

    peft_model, tokenizer = model
    engine = Engine(*model)
    rng = random.Random(0)
    for _ in range(20):
        row = batching._Row(Request([1], 10, Collected()), None, 1)
        for _ in range(rng.randrange(1, 80)):
            row.generated.append(rng.randrange(len(tokenizer)))
            text = engine._text(row)
            assert tokenizer.decode(row.generated, skip_special_tokens=True).startswith(text.rstrip("\ufffd"))
        assert engine._text(row) == tokenizer.decode(row.generated, skip_special_tokens=True)


def test_a_4bit_base_batches_mixed_adapters_as_exactly(tiny_models):
    """QLoRA serving: over a bitsandbytes NF4 base (CPU kernels), a mixed batch equals one request at a time."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    folder = tiny_models["neox"]
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    base = AutoModelForCausalLM.from_pretrained(folder, quantization_config=quantization, device_map="cpu")
    assert type(base.gpt_neox.layers[0].mlp.dense_h_to_4h).__name__ == "Linear4bit"
    torch.manual_seed(0)
    lora = dict(r=4, lora_alpha=8, init_lora_weights=False, target_modules="all-linear")
    peft_model = get_peft_model(base, LoraConfig(**lora), adapter_name="a")
    peft_model.add_adapter("b", LoraConfig(**lora))
    peft_model.eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = [encode(tokenizer, p) for p in PROMPTS]
    want = [tokenizer.decode(one_at_a_time(peft_model, i, a), skip_special_tokens=True) for i, a in zip(ids, ADAPTERS)]
    engine = engine_for((peft_model, tokenizer))
    try:
        got = [Collected() for _ in PROMPTS]
        engine.submit(*(Request(i, N, g, adapter=a) for i, g, a in zip(ids, got, ADAPTERS)))
        assert [g.last.finish_reason for g in got] == ["length"] * 4
        assert [g.text for g in got] == want
    finally:
        engine.close(1)
