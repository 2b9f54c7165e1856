"""Tokens/s and latency of `finetune serve` under 1, 4 and 16 concurrent clients vs one request at a time.

    python benchmarks/serve.py                        # tiny GPT-Neo and a GPT-Neo-125M-shaped model, CPU
    python benchmarks/serve.py --shapes tiny --clients 1,4  # a quick check of the script itself
    python benchmarks/serve.py --shapes pythia-1.4b --dtype bfloat16   # on a GPU (serve and generate use it)

Builds each base (random weights, the tiny offline tokenizer) and two random LoRA adapters (r=16 on every
attention and MLP projection, sealed with a MANIFEST.json as training writes them), then:
- baseline: `finetune generate`'s code (generate.load + Session.complete, greedy), one request after another,
  switching adapters between requests: what a user without a server does;
- ours: `python -m finetune serve BASE-ADAPTERS` in its own process on 127.0.0.1, driven over HTTP by N client
  threads (the official `openai` client), requests alternating between the two adapters.
Prompts are 64 tokens, each request asks for 64 new tokens, greedy (EOS still ends a request, in both). Prints
tokens/s and p50/p95 latency per concurrency, the ratio to the baseline, and whether every server answer equals the
baseline's text for the same prompt and adapter (target at 16 clients: >= 4x with identical greedy outputs).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
SHAPES = {  # name -> (family, hidden, layers, heads); None: finetune.tiny's own defaults
    "tiny": ("neo", None, None, None),
    "125m": ("neo", 768, 12, 12),
    "pythia-1.4b": ("neox", 2048, 24, 16),
}
PROMPT_TOKENS, NEW_TOKENS = 64, 64


def build_base(shape: str, folder: Path, dtype: str) -> Path:
    """Random weights of the shape with the tiny tokenizer (its ids fit every vocabulary here)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPTNeoConfig, GPTNeoXConfig

    from finetune.models import tiny

    family, hidden, layers, heads = SHAPES[shape]
    if hidden is None:
        tiny.build(family, folder)
        return folder
    if family == "neo":
        config = GPTNeoConfig(
            vocab_size=50257, max_position_embeddings=2048, hidden_size=hidden, num_layers=layers, num_heads=heads,
            attention_types=[[["global", "local"], layers // 2]], window_size=256, intermediate_size=4 * hidden,
        )  # fmt: skip
    else:
        config = GPTNeoXConfig(
            vocab_size=50304, max_position_embeddings=2048, hidden_size=hidden, num_hidden_layers=layers,
            num_attention_heads=heads, intermediate_size=4 * hidden, rotary_pct=0.25, use_parallel_residual=True,
        )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(getattr(torch, dtype))
    model.save_pretrained(folder)
    source = folder.parent / "tokenizer-source"
    if not source.exists():
        tiny.build(family, source)
    AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    return folder


def build_adapter(base: Path, folder: Path, seed: int) -> Path:
    """A LoRA adapter with random A and B (so it changes the output), saved by peft and sealed."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(folder)
    subprocess.run([sys.executable, "-m", "finetune", "checkpoints", "seal", str(folder)], check=True, cwd=PROJECT)
    return folder


def prompts(tokenizer, count: int) -> list[str]:
    """`count` different texts of exactly PROMPT_TOKENS tokens each."""
    import random

    words = "the court held that a contract requires an offer acceptance and consideration patients with".split()
    out = []
    for i in range(count):
        rng = random.Random(i)  # a different word order for each prompt
        text = " ".join(rng.choice(words) for _ in range(PROMPT_TOKENS * 2))
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:PROMPT_TOKENS]
        out.append(tokenizer.decode(ids))
    return out


def baseline(base: Path, adapters: list[Path], texts: list[str], names: list[str], dtype: str) -> dict:
    """generate's code, one request at a time: (seconds, tokens, latencies, outputs by (text, adapter))."""
    from finetune.inference import generate

    session = generate.load(adapters[0], adapters=adapters[1:], base=str(base), dtype=dtype)
    session.use(names[0])
    session.complete(texts[0], max_new_tokens=4)  # warm-up
    decode, generated = session.tokenizer.decode, []

    def counting_decode(ids, *args, **kwargs):  # complete() decodes exactly the new ids: count them
        generated.append(len(ids))
        return decode(ids, *args, **kwargs)

    session.tokenizer.decode = counting_decode
    outputs, latencies, tokens = {}, [], 0
    start = time.perf_counter()
    for i, text in enumerate(texts):
        name = names[i % len(names)]
        t = time.perf_counter()
        session.use(name)
        completion = session.complete(text, max_new_tokens=NEW_TOKENS)
        latencies.append(time.perf_counter() - t)
        tokens += generated[-1]
        outputs[(text, name)] = completion
    return {"seconds": time.perf_counter() - start, "tokens": tokens, "latencies": latencies, "outputs": outputs}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(base: Path, adapters: list[Path], dtype: str, max_batch: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "finetune", "serve", *map(str, adapters), f"base={base}", f"port={port}"]
    command += [f"dtype={dtype}", f"max_batch={max_batch}"]
    server = subprocess.Popen(command, cwd=PROJECT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with {server.returncode}:\n{server.stderr.read()}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1) as answer:
                if answer.status == 200:
                    return server, url
        except OSError:  # not listening yet (URLError and connection errors are OSErrors)
            time.sleep(0.5)
    raise SystemExit("the server did not become healthy in 10 minutes")


def drive(url: str, texts: list[str], names: list[str], clients: int) -> dict:
    """`clients` threads, each sending its share of the requests one after another; greedy completions."""
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
    jobs = [(text, names[i % len(names)]) for i, text in enumerate(texts)]
    outputs, latencies, tokens, lock = {}, [], [0], threading.Lock()

    def worker(mine):
        for text, name in mine:
            t = time.perf_counter()
            answer = client.completions.create(model=name, prompt=text, max_tokens=NEW_TOKENS, temperature=0)
            with lock:
                latencies.append(time.perf_counter() - t)
                tokens[0] += answer.usage.completion_tokens
                outputs[(text, name)] = answer.choices[0].text

    threads = [threading.Thread(target=worker, args=(jobs[k::clients],)) for k in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"seconds": time.perf_counter() - start, "tokens": tokens[0], "latencies": latencies, "outputs": outputs}


def row(label: str, result: dict, base_rate: float | None, reference: dict | None) -> str:
    rate = result["tokens"] / result["seconds"]
    lat = sorted(result["latencies"])
    p95 = lat[min(len(lat) - 1, round(0.95 * (len(lat) - 1)))]
    ratio = f"{rate / base_rate:.2f}x" if base_rate else "1.00x"
    same = ""
    if reference is not None:
        shared = [key for key in result["outputs"] if key in reference]
        equal = sum(reference[key] == result["outputs"][key] for key in shared)
        same = f"{equal}/{len(shared)}"
    return (
        f"| {label} | {len(lat)} | {result['tokens']} | {result['seconds']:.1f} | {rate:.1f} | "
        f"{statistics.median(lat):.2f} | {p95:.2f} | {ratio} | {same} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="tiny,125m")
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--requests", type=int, default=32, help="requests per concurrency level (baseline: 16)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="serve-bench-"))
    from transformers import AutoTokenizer

    for shape in args.shapes.split(","):
        root = workdir / shape
        base = root / "base"
        if not base.exists():
            build_base(shape, base, args.dtype)
        adapters = [root / "legal", root / "medical"]
        for seed, folder in enumerate(adapters, 1):
            if not folder.exists():
                build_adapter(base, folder, seed)
        names = [a.name for a in adapters]
        texts = prompts(AutoTokenizer.from_pretrained(base), max(args.requests, 16))
        base_result = baseline(base, adapters, texts[:16], names, args.dtype)
        base_rate = base_result["tokens"] / base_result["seconds"]
        print(f"\n{shape}: {PROMPT_TOKENS}-token prompts, {NEW_TOKENS} new tokens, greedy, {args.dtype}, 2 adapters")
        print("| run | requests | tokens | seconds | tokens/s | p50 s | p95 s | vs baseline | equal to baseline |")
        print("|---|---|---|---|---|---|---|---|---|")
        print(row("baseline: generate, one at a time", base_result, None, None))
        server, url = start_server(base, adapters, args.dtype, max(levels))
        try:
            drive(url, texts[:2], names, 2)  # warm-up
            for clients in levels:
                result = drive(url, texts[: args.requests], names, clients)
                print(row(f"finetune serve, {clients} clients", result, base_rate, base_result["outputs"]), flush=True)
        finally:
            server.terminate()
            server.wait(60)
    print(json.dumps({"workdir": str(workdir), "cpus": os.cpu_count()}))


if __name__ == "__main__":
    main()
