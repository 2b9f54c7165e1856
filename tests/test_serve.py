"""finetune serve on real runs of the three tiny families, over a real TCP port on 127.0.0.1, driven by the official
`openai` client and by raw HTTP for what a well-behaved client never sends.

One server (in a thread of this process) serves two NeoX adapters over one base, a GPT-Neo and a GPT-J adapter, and
a merged model; a second, with a one-row batch and a one-request queue, shows the 429; the CLI test runs
`python -m finetune serve` in a subprocess and stops it with SIGTERM while a request is in flight.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from finetune.config.compose import compose
from finetune.inference import generate, serve
from finetune.train.run import run

from helpers import PROJECT, tiny_overrides

KEY = "sk-test-9f8e7d6c5b4a"  # the in-process server's, from $FINETUNE_API_KEY
CLI_KEY = "sk-cli-0a1b2c3d4e5f"  # the subprocess's, on its command line
PROMPT, INPUT, TEXT = "What is a tort?", "The tenant broke a window.", "The court held that"
N = 8  # max_tokens of the comparisons
ARCH_RUN = {"neox": "alpha", "neo": "gamma", "gptj": "delta"}


@pytest.fixture(scope="module")
def runs(tiny_models, tmp_path_factory):
    """Short LoRA runs trained for real: two on tiny NeoX (different seeds), one on tiny Neo, one on tiny GPT-J; alpha
    also merged."""
    from finetune.adapters import merge

    root = tmp_path_factory.mktemp("serve")

    def train(name: str, arch: str, *extra: str):
        overrides = ("trainer.max_steps=2", "sample_generations=0", "eval_before_training=false", *extra)
        return run(compose("demo", tiny_overrides(arch, tiny_models[arch], root / name, *overrides)))

    found = {"alpha": train("alpha", "neox"), "beta": train("beta", "neox", "seed=7")}
    found |= {"gamma": train("gamma", "neo"), "delta": train("delta", "gptj")}
    merge.main([str(found["alpha"])])
    return found


class Server:
    """An app of finetune serve on uvicorn, on a free port of 127.0.0.1, in a thread of this process."""

    def __init__(self, args: list[str], env_key: str | None = None):
        previous = os.environ.pop("FINETUNE_API_KEY", None)
        if env_key:
            os.environ["FINETUNE_API_KEY"] = env_key
        try:
            self.app = serve.build(serve.parse(args))
        finally:
            os.environ.pop("FINETUNE_API_KEY", None)
            if previous is not None:
                os.environ["FINETUNE_API_KEY"] = previous
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]

    def client(self, key: str | None = KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=key or "none", max_retries=0)

    def engine(self, model: str):
        return self.app.state.api.models[model].engine

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def server(runs):
    """alpha + beta over one tiny NeoX (served as neox too), gamma over tiny Neo, delta over tiny GPT-J, alpha merged;
    the API key from $FINETUNE_API_KEY."""
    models = [runs[name] for name in ("alpha", "beta", "gamma", "delta")] + [runs["alpha"] / "merged"]
    started = Server([str(m) for m in models], env_key=KEY)
    yield started
    started.stop()


@pytest.fixture(scope="module")
def sessions(runs):
    """finetune generate's sessions of alpha, gamma and delta: what the server must answer, greedy."""
    return {name: generate.load(runs[name]) for name in ARCH_RUN.values()}


def call(port: int, path: str, body=None, *, key: str | None = KEY, raw: bytes | None = None, method: str = "POST"):
    """(status, headers, parsed JSON or text) of one raw HTTP request."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    connection.request(method, path, body=data, headers=headers)
    response = connection.getresponse()
    text = response.read().decode()
    connection.close()
    is_json = response.getheader("content-type", "").startswith("application/json")
    return response.status, {k.lower(): v for k, v in response.getheaders()}, json.loads(text) if is_json else text


def open_stream(port: int, path: str, body: dict, key: str = KEY):
    """A streaming request on its own connection; returns (connection, response) to read events from."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    auth = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    connection.request("POST", path, body=json.dumps({**body, "stream": True}).encode(), headers=auth)
    return connection, connection.getresponse()


def next_event(response) -> dict | str:
    """The next `data:` event of a server-sent event stream ("[DONE]" as the string)."""
    while True:
        line = response.readline()
        assert line, "the stream ended without [DONE]"
        if line.startswith(b"data: "):
            data = line[len(b"data: ") :].strip().decode()
            return data if data == "[DONE]" else json.loads(data)


def metric(server: Server, name: str, **labels) -> float:
    status, _, text = call(server.port, "/metrics", method="GET")
    assert status == 200
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def chat(client: openai.OpenAI, model: str, **options):
    message = {"role": "user", "content": PROMPT, "input": INPUT}  # alpaca's input field travels with the message
    return client.chat.completions.create(
        model=model, messages=[message], **{"max_tokens": N, "temperature": 0} | options
    )


def complete(client: openai.OpenAI, model: str, prompt: str = TEXT, **options):
    return client.completions.create(model=model, prompt=prompt, **{"max_tokens": N, "temperature": 0} | options)


def test_models_lists_each_adapter_its_base_and_the_merged_model(server):
    models = {m.id: m for m in server.client().models.list().data}
    assert list(models) == ["neox", "alpha", "beta", "neo", "gamma", "gptj", "delta", "alpha-merged"]
    status, _, body = call(server.port, "/v1/models", method="GET")
    parents = {m["id"]: m["parent"] for m in body["data"]}
    assert parents["alpha"] == parents["beta"] == "neox" and parents["gamma"] == "neo" and parents["neox"] is None
    assert len(server.app.state.api.engines) == 4  # alpha and beta share the NeoX base: one copy, one engine


@pytest.mark.parametrize("arch", list(ARCH_RUN))
def test_greedy_chat_and_completion_equal_finetune_generate(server, sessions, arch):
    name = ARCH_RUN[arch]
    session, client = sessions[name], server.client()
    expected = session.generate(PROMPT, input=INPUT, max_new_tokens=N)
    answer = chat(client, name)
    assert answer.choices[0].message.content == expected and expected.strip()
    assert complete(client, name).choices[0].text == session.complete(TEXT, max_new_tokens=N)


def test_merged_model_answers_as_its_adapter(server, sessions):
    client = server.client()
    assert chat(client, "alpha-merged").choices[0].message.content == chat(client, "alpha").choices[0].message.content


def test_base_continues_raw_text_and_refuses_chat(server, tiny_models):
    plain = generate.load(tiny_models["neox"])
    client = server.client()
    assert complete(client, "neox").choices[0].text == plain.complete(TEXT, max_new_tokens=N)
    with pytest.raises(openai.BadRequestError, match="/v1/completions"):
        chat(client, "neox")


def test_concurrent_requests_for_different_adapters_equal_each_alone(server):
    client, engine = server.client(), server.engine("alpha")
    work = [
        ("alpha", "chat", PROMPT),
        ("beta", "chat", PROMPT),
        ("neox", "complete", TEXT),
        ("alpha", "complete", "A contract is"),
        ("beta", "complete", TEXT),
        ("alpha", "chat", "Define negligence."),
    ]

    def ask(item):
        model, kind, text = item
        if kind == "chat":
            messages = [{"role": "user", "content": text}]
            reply = client.chat.completions.create(model=model, messages=messages, max_tokens=16, temperature=0)
            return reply.choices[0].message.content
        return complete(client, model, text, max_tokens=16).choices[0].text

    before = engine.steps
    alone = [ask(item) for item in work]
    sequential = engine.steps - before
    barrier = threading.Barrier(len(work))

    def ask_together(item):
        barrier.wait()  # all sent at once
        return ask(item)

    with ThreadPoolExecutor(len(work)) as pool:
        before = engine.steps
        together = list(pool.map(ask_together, work))
    assert together == alone
    assert alone[0] != alone[1]  # the adapters differ, so a mixed batch had something to get wrong
    assert engine.steps - before < sequential  # they shared forward passes


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_streamed_text_equals_the_whole_answer(server, kind):
    client = server.client()
    ask = chat if kind == "chat" else complete
    whole = ask(client, "beta", max_tokens=12)
    chunks = list(ask(client, "beta", max_tokens=12, stream=True, stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content if kind == "chat" else c.choices[0].text for c in chunks if c.choices]
    text = whole.choices[0].message.content if kind == "chat" else whole.choices[0].text
    assert "".join(p or "" for p in pieces) == text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert {c.id for c in chunks} == {chunks[0].id}


def test_stop_strings_cut_the_text_and_finish_with_stop(server):
    client = server.client()
    full = complete(client, "alpha", max_tokens=16)
    text = full.choices[0].text
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 16
    stop = next(text[i : i + 3] for i in range(len(text) // 3, len(text) - 3) if text.find(text[i : i + 3]) > 0)
    for stops in (stop, ["never in the text", stop]):
        cut = complete(client, "alpha", max_tokens=16, stop=stops).choices[0]
        assert (cut.text, cut.finish_reason) == (text[: text.find(stop)], "stop")
    streamed = complete(client, "alpha", max_tokens=16, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == text[: text.find(stop)]


def test_n_choices_are_reproducible_by_seed(server):
    client = server.client()
    sample = {"temperature": 1.0, "seed": 11, "max_tokens": N}
    first = [c.text for c in complete(client, "gamma", n=2, **sample).choices]
    again = [c.text for c in complete(client, "gamma", n=2, **sample).choices]
    assert first == again and first[0] != first[1]
    assert complete(client, "gamma", **(sample | {"seed": 12})).choices[0].text == first[1]  # choice i: seed + i
    replies = chat(client, "gamma", n=2, **sample).choices
    assert [c.index for c in replies] == [0, 1]


def test_usage_counts_the_tokens_of_the_rendered_prompt(server, sessions):
    session = sessions["alpha"]
    rendered = session.prompting.text(session.tokenizer, PROMPT, input=INPUT)
    usage = chat(server.client(), "alpha").usage
    assert usage.prompt_tokens == len(session.tokenizer(rendered, add_special_tokens=False)["input_ids"])
    assert usage.completion_tokens == N and usage.total_tokens == usage.prompt_tokens + N
    usage = complete(server.client(), "alpha", n=2).usage
    assert usage.prompt_tokens == len(session.tokenizer(TEXT, add_special_tokens=False)["input_ids"])
    assert usage.completion_tokens == 2 * N


LONG = "the court held " * 200  # 600 tokens: more than the tiny models' context of 512


@pytest.mark.parametrize(
    ("path", "body", "status", "param", "words"),
    [
        ("/v1/chat/completions", {"model": "nope", "messages": []}, 400, "messages", ["at least 1"]),
        ("/v1/completions", {"model": "nope", "prompt": "x"}, 404, "model", ["'nope'", "alpha, beta"]),
        ("/v1/chat/completions", {"model": "alpha", "messages": "hi"}, 400, "messages", ["valid array"]),
        ("/v1/completions", {"model": "alpha", "prompt": "x", "max_tokens": "5"}, 400, "max_tokens", ["integer"]),
        ("/v1/completions", {"model": "alpha", "prompt": "x", "stream": "yes"}, 400, "stream", ["boolean"]),
        ("/v1/completions", {"prompt": "x"}, 400, "model", ["Field required"]),
        ("/v1/completions", {"model": "gamma", "prompt": LONG[:1400], "max_tokens": 200}, 400, "max_tokens", ["512"]),
        ("/v1/completions", {"model": "gamma", "prompt": LONG}, 400, "prompt", ["context of 512"]),
        ("/v1/completions", {"model": "gamma", "prompt": "x", "max_tokens": 5000}, 400, "max_tokens", ["1024"]),
        ("/v1/completions", {"model": "gamma", "prompt": "x", "n": 9}, 400, "n", ["max_n=4"]),
        ("/v1/completions", {"model": "gamma", "prompt": "x", "stop": list("abcde")}, 400, "stop", ["at most 4"]),
        ("/v1/completions", {"model": "gamma", "prompt": "x", "logit_bias": {"5": 10}}, 400, "logit_bias", []),
        ("/v1/completions", {"model": "gamma", "prompt": ""}, 400, "prompt", ["empty"]),
        ("/v1/completions", {"model": "gamma", "prompt": [99999]}, 400, "prompt", ["token ids"]),
        ("/v1/chat/completions", {"model": "gamma", "messages": [{"role": "system", "content": "Be brief."}]}, 400,
         "messages", ["no system message"]),
    ],
)  # fmt: skip
def test_bad_requests_get_openai_errors_naming_the_field(server, path, body, status, param, words):
    got, _, answer = call(server.port, path, body)
    assert got == status, answer
    error = answer["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    assert all(word in error["message"] for word in words), error["message"]


def test_context_error_names_both_numbers(server, sessions):
    _, _, answer = call(server.port, "/v1/completions", {"model": "gamma", "prompt": TEXT, "max_tokens": 510})
    tokens = len(sessions["gamma"].tokenizer(TEXT, add_special_tokens=False)["input_ids"])
    assert f"the prompt is {tokens} tokens and max_tokens is 510" in answer["error"]["message"]
    assert "context of 512 tokens" in answer["error"]["message"]


def test_malformed_json_is_a_400_and_the_server_keeps_serving(server):
    status, _, answer = call(server.port, "/v1/chat/completions", raw=b'{"model": "alpha",')
    assert status == 400 and answer["error"]["message"].startswith("malformed JSON")
    with pytest.raises(openai.NotFoundError, match="served: neox, alpha"):
        complete(server.client(), "alpah")
    assert complete(server.client(), "alpha").choices[0].text


def test_the_api_key_is_required_except_for_health(server):
    for key in (None, "sk-wrong"):
        status, headers, answer = call(server.port, "/v1/completions", {"model": "alpha", "prompt": "x"}, key=key)
        assert status == 401 and headers["www-authenticate"] == "Bearer" and KEY not in json.dumps(answer)
        assert call(server.port, "/metrics", key=key, method="GET")[0] == 401
    with pytest.raises(openai.AuthenticationError):
        server.client(key="sk-wrong").models.list()
    status, _, health = call(server.port, "/health", key=None, method="GET")
    assert status == 200 and health["status"] == "ok" and "alpha" in health["models"]
    bad_body = call(server.port, "/v1/completions", {"model": 5}, key=None)
    assert bad_body[0] == 401  # no body details before the key is checked


def test_a_client_leaving_mid_stream_frees_its_row_and_others_go_on(server):
    engine, client = server.engine("alpha"), server.client()
    expected = complete(client, "beta", max_tokens=40).choices[0].text
    before = engine.steps
    leaving, response = open_stream(
        server.port, "/v1/completions", {"model": "alpha", "prompt": TEXT, "max_tokens": 500}
    )
    assert next_event(response)["choices"][0]["text"] is not None  # it is decoding
    staying = complete(client, "beta", max_tokens=40, stream=True)
    first = next(staying)
    leaving.sock.shutdown(2)  # the client goes away without a word
    leaving.close()
    assert first.choices[0].text + "".join(c.choices[0].text for c in staying) == expected
    deadline = time.monotonic() + 30
    while engine.running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.running == 0 and engine.steps - before < 300  # far fewer steps than the 500 tokens it asked for
    assert metric(server, "finetune_serve_requests_total", model="alpha", status="499") >= 1


def test_metrics_count_requests_tokens_and_latency(server):
    labels = {"model": "gamma", "endpoint": "/v1/completions"}
    before = {
        "requests": metric(server, "finetune_serve_requests_total", status="200", **labels),
        "completion": metric(server, "finetune_serve_completion_tokens_total", model="gamma"),
        "prompt": metric(server, "finetune_serve_prompt_tokens_total", model="gamma"),
        "latency": metric(server, "finetune_serve_request_duration_seconds_count", **labels),
        "unknown": metric(server, "finetune_serve_requests_total", model="", status="404"),
    }
    answer = complete(server.client(), "gamma")
    call(server.port, "/v1/completions", {"model": "nope", "prompt": "x"})
    assert metric(server, "finetune_serve_requests_total", status="200", **labels) == before["requests"] + 1
    assert metric(server, "finetune_serve_completion_tokens_total", model="gamma") == before["completion"] + N
    prompt = metric(server, "finetune_serve_prompt_tokens_total", model="gamma")
    assert prompt == before["prompt"] + answer.usage.prompt_tokens
    assert metric(server, "finetune_serve_request_duration_seconds_count", **labels) == before["latency"] + 1
    assert metric(server, "finetune_serve_requests_total", model="", status="404") == before["unknown"] + 1
    assert metric(server, "finetune_serve_queue_depth", engine="neo") == 0
    assert metric(server, "finetune_serve_engine_steps_total", engine="neo") > 0


def test_a_full_queue_answers_429_with_retry_after(runs):
    """One batch row and one queue place: a request with 3 prompts (3 engine requests, submitted at once) cannot all be
    taken, so it is refused whole, the parts already queued are cancelled, and the server goes on serving."""
    busy = Server([str(runs["gamma"]), "max_batch=1", "max_queue=1", "max_n=1"])
    engine = busy.engine("gamma")
    try:
        body = {"model": "gamma", "prompt": [TEXT] * 3, "max_tokens": 200}
        status, headers, answer = call(busy.port, "/v1/completions", body, key=None)
        assert status == 429 and headers["retry-after"] == "1" and answer["error"]["code"] == "queue_full"
        with pytest.raises(openai.RateLimitError):
            complete(busy.client(key=None), "gamma", [TEXT] * 3)
        deadline = time.monotonic() + 30
        while (engine.running or engine.queue_depth) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.running == engine.queue_depth == 0  # the cancelled parts were dropped, not decoded
        assert complete(busy.client(key=None), "gamma").choices[0].text  # serving again
    finally:
        busy.stop()


def test_refusals_at_start(runs, tiny_models, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        serve.main([str(runs["alpha"]), str(runs["alpha"] / "adapter")])
    assert exit_info.value.code == 2 and "several models would be served as alpha" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # a base other than the one alpha trained on
        serve.main([str(runs["alpha"]), f"base={tiny_models['gptj']}"])
    assert exit_info.value.code == 3 and "different checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # a mistyped api_key= is named, its value is not shown
        serve.main([str(runs["alpha"]), f"apikey={CLI_KEY}"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "api_key" in err and CLI_KEY not in err
    dora = tmp_path / "dora"  # peft cannot mix a DoRA adapter into a batch: refused by its adapter_config.json
    shutil.copytree(runs["alpha"] / "adapter", dora)
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps(config | {"use_dora": True}))
    with pytest.raises(SystemExit) as exit_info:
        serve.main([str(dora)])
    assert exit_info.value.code == 2 and "DoRA" in capsys.readouterr().err
    corrupt = tmp_path / "corrupt"  # a copy whose weights changed after training sealed them: refused, unloaded
    shutil.copytree(runs["beta"], corrupt)
    weights = corrupt / "adapter" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(SystemExit) as exit_info:
        serve.main([str(runs["alpha"]), str(corrupt)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 3 and "adapter_model.safetensors" in err and "loading" not in err


def test_cli_serves_until_sigterm_finishing_the_request_in_flight(runs, tmp_path):
    """`python -m finetune serve`: the key on its command line never in its output, prompts not logged, and SIGTERM
    while a request streams lets it finish, then exits 0."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "finetune", "serve", str(runs["gamma"]), f"port={port}", f"api_key={CLI_KEY}"],
            cwd=PROJECT,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
    try:
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the server did not start"
            try:
                if call(port, "/health", key=None, method="GET")[0] == 200:
                    break
            except OSError:
                time.sleep(0.2)
        assert call(port, "/v1/models", key="sk-wrong", method="GET")[0] == 401
        body = {"model": "gamma", "prompt": PROMPT, "max_tokens": 300}
        connection, response = open_stream(port, "/v1/completions", body, key=CLI_KEY)
        events = [next_event(response)]
        process.send_signal(signal.SIGTERM)
        while events[-1] != "[DONE]":
            events.append(next_event(response))
        connection.close()
        assert events[-2]["choices"][0]["finish_reason"] in ("stop", "length")  # finished (EOS or 300), not cut
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
    output = log.read_text()
    assert f"serving neo, gamma on http://127.0.0.1:{port}/v1 (an API key is required)" in output
    assert "Waiting for connections to close" in output  # uvicorn waited for the stream in flight
    assert CLI_KEY not in output and PROMPT not in output
