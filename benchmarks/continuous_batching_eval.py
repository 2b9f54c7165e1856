"""Issue 22: is transformers' own continuous batching (`model.generate_batch`, the paged KV cache of
`transformers/generation/continuous_batching/`) correct for GPT-Neo, GPT-NeoX and GPT-J, with LoRA and with several
adapters in one batch? Compared with `model.generate` one prompt at a time and with our engine
(finetune.inference.batching, a DynamicCache with left padding).

    python benchmarks/continuous_batching_eval.py                 # ~1 min on 2 CPU cores
    python benchmarks/continuous_batching_eval.py --archs gptj --default-cache   # + transformers' default cache size

On the unpretrained tiny models of each family (finetune.models.tiny, built once into --folder; 4 layers x 128,
GPT-Neo's local window 32 tokens), 6 prompts of 5-100 tokens of English, greedy, --new-tokens each, no EOS stop:
- runs?: whether every request comes back without an error;
- greedy = generate?: token ids equal to `generate` on that prompt alone (else the first differing position);
- local window (GPT-Neo): the output on all prompts equals the eager model's (transformers' reference layer), and the
  prompts are long enough to tell: the same model with its local layers made global gives other tokens;
- LoRA?: a PeftModel (two random adapters a and b on every linear layer, a active): equal to peft's `generate`;
- mixed adapters?: per-prompt adapters (a, b, base, ...) through peft's `adapter_names`: equal to `generate` with
  each prompt's adapter;
- tok/s: generated tokens / wall seconds, best of --repeats after a warm-up, all prompts; one-at-a-time is the
  `generate` reference; CB both per `generate_batch` call and on one started manager (add_requests + get_result).
  One torch thread by default (--threads): two threads on a busy 2-core machine made each tiny matmul ~100x slower.
  transformers' CB gets a small explicit cache (--blocks x 32-token pages): its default on CPU sizes the cache at
  60% of RAM (--default-cache measures that: 13.7 GiB of RSS and 17 s per call on a 24 GiB machine).
Diagnostic rows marked "+ update shim" patch `PagedAttentionCache.update` in this process only, handing it the
paged-cache kwargs (read/write indices) that GPT-Neo's and GPT-NeoX's attention layers do not pass to it, to see what
is wrong beyond that crash. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import resource
import threading
import time
from pathlib import Path

import torch

ARCHS = ("neo", "neox", "gptj")
LENGTHS = (70, 5, 100, 23, 40, 12)  # tiny GPT-Neo's local window is 32 tokens
ADAPTERS = ("a", "b", "__base__", "a", "b", "__base__")  # a mixed batch, per prompt
CB_KWARGS = ("cu_seq_lens_k", "max_length_k", "read_index", "write_index", "block_table")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", default="/tmp/cbeval", help="where the tiny checkpoints are built (once)")
    parser.add_argument("--archs", default=",".join(ARCHS))
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--blocks", type=int, default=64, help="CB cache size in 32-token pages")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: robust on a shared machine)")
    parser.add_argument("--default-cache", action="store_true", help="also time CB with its default (60%% RAM) cache")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import transformers

    import finetune.models.neo_attention  # noqa: F401 - registers our GPT-Neo SDPA layer ("sdpa"), as the project does

    transformers.logging.set_verbosity_error()
    logging.getLogger("ContinuousBatchingLogger").setLevel(logging.CRITICAL)  # failed requests carry their error
    print(
        f"transformers {transformers.__version__}, torch {torch.__version__}, {os.cpu_count()} CPUs, "
        f"{torch.get_num_threads()} torch thread(s), load average {os.getloadavg()[0]:.1f} at start",
        flush=True,
    )
    rows = []
    for arch in args.archs.split(","):
        rows += evaluate(arch, Path(args.folder), args)
    header = ["arch", "path", "runs?", "greedy = generate?", "local window?", "LoRA?", "mixed adapters?", "tok/s"]
    print(f"\nload average {os.getloadavg()[0]:.1f} at end\n")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(row.get(k, "")) for k in header) + " |")


def evaluate(arch: str, folder: Path, args) -> list[dict]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.models import neo_attention, tiny

    path = folder / arch
    if not (path / "config.json").exists():
        tiny.build(arch, path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompts = make_prompts(tokenizer)
    n = args.new_tokens
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    neo_attention.enable(base)  # GPT-Neo: the project's SDPA layer (no-op for the others)
    ref, ref_s = timed(lambda: one_at_a_time(base, prompts, n), args.repeats)
    assert all(len(r) == n for r in ref), "a reference stopped early"
    total = n * len(prompts)
    window = WindowCheck(path, prompts, n) if arch == "neo" else None

    torch.manual_seed(0)
    lora = dict(r=4, lora_alpha=8, init_lora_weights=False, target_modules="all-linear")
    peft_model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), LoraConfig(**lora), "a"
    )
    peft_model.add_adapter("b", LoraConfig(**lora))
    peft_model.eval()
    neo_attention.enable(peft_model)
    lora_ref = {name: one_at_a_time(peft_model, prompts, n, name) for name in ("a", "b")}
    assert lora_ref["a"] != ref and lora_ref["b"] != ref, "an adapter that changes nothing tests nothing"
    mixed_ref = [(ref if name == "__base__" else lora_ref[name])[i] for i, name in enumerate(ADAPTERS)]
    peft_model.set_adapter("a")

    reference = {
        "path": "`generate`, one prompt at a time (reference)",
        "greedy = generate?": "reference",
        "local window?": window.verdict(ref) if window else "n/a",
        "LoRA?": "reference (peft `generate`)",
        "mixed adapters?": "reference (one `generate` per adapter)",
        "tok/s": f"{total / ref_s:.0f}",
    }
    rows = [reference]
    variants = [("transformers CB `generate_batch`", base.config._attn_implementation, False)]
    if arch == "neo":  # our SDPA layer (what the project runs), then transformers' eager layer
        variants.append(("transformers CB `generate_batch`", "eager", False))
    if arch in ("neo", "neox"):
        variants.append(("transformers CB + update shim (diagnostic)", base.config._attn_implementation, True))
    if arch == "neo":
        variants.append(("transformers CB + update shim (diagnostic)", "eager", True))
    for label, attn, shim in variants:
        with attention(base, attn), attention(peft_model, attn):
            rows.append(cb_row(label, base, peft_model, prompts, ref, lora_ref["a"], mixed_ref, window, shim, args))
    if arch == "neo":  # one request per generate_batch call: nothing else in the packed batch
        with update_shim(base):
            got = [cb_generate(base, [p], n, args.blocks)[0][0] for p in prompts]
        rows.append(
            {
                "path": "transformers CB + update shim (diagnostic), one request per call, finetune SDPA attention",
                "runs?": "yes",
                "greedy = generate?": compare(got, ref),
                "local window?": window.verdict(got),
            }
        )
    if args.default_cache:
        rows.append(default_cache_row(base, prompts, n))
    rows.append(engine_row(base, peft_model, tokenizer, prompts, ref, lora_ref["a"], mixed_ref, window, args))
    for row in rows:
        row["arch"] = arch
        row.setdefault("runs?", "yes")
    return rows


def make_prompts(tokenizer) -> list[list[int]]:
    """Token slices of English prose (the Python reference bundled with CPython) of LENGTHS tokens."""
    from finetune.models.tiny import general_english

    ids = tokenizer(" ".join(general_english()[:400]), add_special_tokens=False)["input_ids"]
    return [ids[1000 * i : 1000 * i + length] for i, length in enumerate(LENGTHS)]


def one_at_a_time(model, prompts, n: int, adapter: str | None = None) -> list[list[int]]:
    from transformers import GenerationConfig

    if adapter is not None:
        model.set_adapter(adapter)
    config = GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    outs = []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), generation_config=config)
            outs.append(out[0, len(ids) :].tolist())
    return outs


def timed(run, repeats: int):
    """run()'s result and its best wall time over `repeats` calls after one warm-up."""
    result = run()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - start)
    return result, best


def compare(got: list[list[int]], want: list[list[int]]) -> str:
    """'yes', or which prompts differ and at which generated position first."""
    diffs = []
    for i, (g, w) in enumerate(zip(got, want)):
        if g != w:
            first = next((k for k, (a, b) in enumerate(zip(g, w)) if a != b), min(len(g), len(w)))
            diffs.append(f"p{i} ({LENGTHS[i]} tok) @{first}")
    return "yes" if not diffs else f"no: {len(diffs)}/{len(want)} differ, " + ", ".join(diffs)


class WindowCheck:
    """GPT-Neo: outputs of the eager layer (transformers' reference) and of the same weights with every local layer
    made global (the window ignored); a path honours the window when it gives the former."""

    def __init__(self, path: Path, prompts, n: int):
        from transformers import AutoModelForCausalLM
        from transformers.models.gpt_neo.modeling_gpt_neo import GPTNeoSelfAttention

        eager = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
        self.eager = one_at_a_time(eager, prompts, n)
        for module in eager.modules():
            if isinstance(module, GPTNeoSelfAttention) and module.attention_type == "local":
                module.bias = torch.tril(torch.ones_like(module.bias))  # causal, no window
        self.ignored = one_at_a_time(eager, prompts, n)
        assert self.ignored != self.eager, "the prompts do not reach past the window: the check could not tell"

    def verdict(self, got) -> str:
        if got == self.eager:
            return "yes (= eager)"
        if got == self.ignored:
            return "no (= window ignored)"
        return "no (= neither eager nor window-ignored)"


@contextlib.contextmanager
def attention(model, implementation: str):
    """GPT-Neo: our "sdpa" layer or transformers' eager one (neo_attention swaps the classes); others unchanged."""
    from finetune.models import neo_attention

    before = model.config._attn_implementation
    if implementation != before:
        (neo_attention.disable if implementation == "eager" else neo_attention.enable)(model)
    try:
        yield
    finally:
        if implementation != before:
            (neo_attention.enable if before == "sdpa" else neo_attention.disable)(model)


@contextlib.contextmanager
def update_shim(*models):
    """Diagnostic: GPT-Neo and GPT-NeoX call `cache.update(key, value, layer_idx)` without the kwargs
    `PagedAttentionCache.update` needs; hand it those of the current forward (captured by a pre-hook on `models`)."""
    from transformers.generation.continuous_batching.cache import PagedAttentionCache

    stash: dict = {}

    def capture(module, args, kwargs):
        stash.clear()
        stash.update(kwargs)

    original = PagedAttentionCache.update

    def update(self, key, value, layer_idx, kwargs=None):
        if kwargs is None:
            kwargs = {k: stash[k] for k in CB_KWARGS if k in stash}
        return original(self, key, value, layer_idx, kwargs)

    handles = [model.register_forward_pre_hook(capture, with_kwargs=True) for model in models]
    PagedAttentionCache.update = update
    try:
        yield
    finally:
        PagedAttentionCache.update = original
        for handle in handles:
            handle.remove()


def cb_generate(model, prompts, n: int, blocks: int | None, **kwargs):
    """transformers' generate_batch, greedy: (tokens per prompt, errors); a missing result counts as an error."""
    from transformers import ContinuousBatchingConfig, GenerationConfig

    config = GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    cb = ContinuousBatchingConfig() if blocks is None else ContinuousBatchingConfig(num_blocks=blocks, page_size=32)
    results = list(model.generate_batch(prompts, config, cb, warmup=False, **kwargs).values())
    errors = sorted({r.error for r in results if r.error})
    if len(results) < len(prompts):
        errors.append(f"{len(prompts) - len(results)} result(s) missing")
    return [r.generated_tokens for r in results], errors


def timed_persistent(model, prompts, n: int, blocks: int, repeats: int):
    """One started manager (what a server would keep): add_requests + collect, best of `repeats` after a warm-up;
    generate_batch instead pays for a manager per call, mostly in its stop() (gc.collect, thread join)."""
    from transformers import ContinuousBatchingConfig, GenerationConfig

    config = GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=-1, pad_token_id=0)
    manager = model.init_continuous_batching(config, ContinuousBatchingConfig(num_blocks=blocks, page_size=32))
    manager.start()

    def run():
        ids = manager.add_requests(prompts, max_new_tokens=n)
        results = {}
        while len(results) < len(ids) and manager.is_running():
            result = manager.get_result(timeout=1)
            if result is not None and result.is_finished():
                results[result.request_id] = result
        return [results[i].generated_tokens if i in results else [] for i in ids]

    try:
        return timed(run, repeats)
    finally:
        manager.stop(block=True, timeout=10)
        manager.destroy()


def cb_row(label, base, peft_model, prompts, ref, lora_ref, mixed_ref, window, shim: bool, args) -> dict:
    n = args.new_tokens
    attn = base.config._attn_implementation
    row = {"path": label + (f", {'finetune SDPA' if attn == 'sdpa' else attn} attention" if window else "")}
    with update_shim(base, peft_model.get_base_model()) if shim else contextlib.nullcontext():
        (got, errors), seconds = timed(lambda: cb_generate(base, prompts, n, args.blocks), args.repeats)
        if errors:
            row["runs?"] = "no: " + "; ".join(errors)
            return {**row, "greedy = generate?": "-", "local window?": "-", "LoRA?": "-", "mixed adapters?": "-"}
        row["greedy = generate?"] = compare(got, ref)
        row["local window?"] = window.verdict(got) if window else "n/a"
        kept, steady = timed_persistent(base, prompts, n, args.blocks, args.repeats)
        if kept != got:
            row["greedy = generate?"] += f"; persistent manager: {compare(kept, ref)}"
        row["tok/s"] = f"{n * len(prompts) / seconds:.0f} per call; {n * len(prompts) / steady:.0f} persistent"
        # a PeftModel forwards generate_batch to the wrapped model (peft_model.py __getattr__): the active adapter
        lora, errors = cb_generate(peft_model, prompts, n, args.blocks)
        row["LoRA?"] = ("no: " + "; ".join(errors)) if errors else f"{compare(lora, lora_ref)} (active adapter)"
        # generate_batch(**kwargs) keeps only max_new_tokens: adapter_names goes nowhere
        mixed, errors = cb_generate(peft_model, prompts, n, args.blocks, adapter_names=list(ADAPTERS))
        verdict = "yes" if mixed == mixed_ref else ("ignored (= active adapter a)" if mixed == lora_ref else "no")
        manager_error = add_request_with_adapter(peft_model, prompts[0], n, args.blocks)
        row["mixed adapters?"] = f"generate_batch: {verdict}; add_request: {manager_error}"
    return row


def add_request_with_adapter(peft_model, ids, n: int, blocks: int) -> str:
    """The manager's own API: add_request(..., adapter_names=[...]) becomes a logits-processor kwarg."""
    from transformers import ContinuousBatchingConfig, GenerationConfig

    config = GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    manager = peft_model.init_continuous_batching(config, ContinuousBatchingConfig(num_blocks=blocks, page_size=32))
    manager.start()
    try:
        request = manager.add_request(ids, adapter_names=["b"], max_new_tokens=n)
        result = None
        while result is None and manager.is_running():
            result = manager.get_result(request, timeout=1)
    finally:
        manager.stop(block=True, timeout=10)
    if result is None:
        return "no result"
    return f"rejected ({result.error.split('.')[0]})" if result.error else "accepted"


def default_cache_row(base, prompts, n: int) -> dict:
    """transformers' CB with its default config on CPU (the cache sized from free RAM): wall time and peak RSS."""
    start = time.perf_counter()
    got, errors = cb_generate(base, prompts, n, None)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {
        "path": f"transformers CB, default ContinuousBatchingConfig: {seconds:.1f} s, peak RSS {peak:.1f} GiB",
        "runs?": "no: " + "; ".join(errors) if errors else "yes",
        "tok/s": f"{n * len(prompts) / seconds:.0f}",
    }


def engine_run(model, tokenizer, prompts, n: int, adapters) -> tuple[list[list[int]], list[str]]:
    """Our engine: all prompts submitted at once; each request's generated ids (recorded as it ends)."""
    from finetune.inference.batching import Engine, Request

    tokens: dict[int, list[int]] = {}

    class Recording(Engine):
        def _emit(self, row, token):
            going = super()._emit(row, token)
            if not going:
                tokens[id(row.request)] = list(row.generated)
            return going

    engine = Recording(model, tokenizer, max_batch=len(prompts))
    engine.eos = -1  # no stop on EOS, like the references
    done = [threading.Event() for _ in prompts]
    errors: list[str] = []

    def emit(k):
        def callback(update):
            if update.finish_reason:
                if update.error:
                    errors.append(update.error)
                done[k].set()

        return callback

    requests = [Request(ids, n, emit(k), adapter=a) for k, (ids, a) in enumerate(zip(prompts, adapters))]
    for request in requests:  # all queued before the engine starts: one prefill, then shared decode steps
        engine.submit(request)
    engine.start()
    try:
        for event in done:
            event.wait(300)
    finally:
        engine.close(5)
    return [tokens.get(id(r), []) for r in requests], errors


def engine_row(base, peft_model, tokenizer, prompts, ref, lora_ref, mixed_ref, window, args) -> dict:
    n = args.new_tokens
    row = {"path": "finetune engine (inference/batching.py: DynamicCache, left padding)"}
    (got, errors), seconds = timed(lambda: engine_run(base, tokenizer, prompts, n, ["__base__"] * 6), args.repeats)
    if errors:
        return {**row, "runs?": "no: " + "; ".join(sorted(set(errors)))}
    row["greedy = generate?"] = compare(got, ref)
    row["local window?"] = window.verdict(got) if window else "n/a"
    row["tok/s"] = f"{n * len(prompts) / seconds:.0f}"
    lora, _ = engine_run(peft_model, tokenizer, prompts, n, ["a"] * 6)
    row["LoRA?"] = compare(lora, lora_ref)
    mixed, _ = engine_run(peft_model, tokenizer, prompts, n, ADAPTERS)
    row["mixed adapters?"] = compare(mixed, mixed_ref) + " (adapter_names a, b, base)"
    return row


if __name__ == "__main__":
    main()
