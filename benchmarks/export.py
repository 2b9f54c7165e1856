"""CPU generation speed of each export runtime vs transformers on the same model, and file size per quant type.

    python benchmarks/export.py                          # GPT-Neo-125M and Pythia-160M shapes, random weights
    python benchmarks/export.py --shapes tiny-neox --quants f32   # a quick check of the script itself

For each shape: random weights of the real shape (real vocabulary size) with the tiny offline tokenizer, saved as
a plain transformers folder; then every format and quant type `finetune export` offers for that architecture is
exported through the command itself (so each export passes its gate against transformers first, or the row says
FAILED). Speed: batch 1, a 32-token prompt, NEW_TOKENS greedy tokens through each runtime's own KV cache
(Runtime.greedy), against transformers fp32 `generate` (greedy, the same count, its default attention), best of
REPEATS, all with torch's and each runtime's default thread count. Target: the fastest CPU runtime >= 3x
transformers fp32 tokens/s with its gate passing.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))
sys.path.insert(0, str(PROJECT / "benchmarks"))
SHAPES = {  # name -> (family, hidden, layers, heads, vocab); None: finetune.tiny's defaults
    "gpt-neo-125m": ("neo", 768, 12, 12, 50257),
    "pythia-160m": ("neox", 768, 12, 12, 50304),
    "tiny-neox": ("neox", None, None, None, None),
}
NEW_TOKENS, PROMPT_TOKENS, REPEATS = 128, 32, 2


def build(shape: str, folder: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.models import tiny

    family, hidden, layers, heads, vocab = SHAPES[shape]
    if hidden is None:
        return tiny.build(family, folder)
    config = tiny.model_config(
        family, vocab_size=vocab, hidden=hidden, layers=layers, heads=heads, positions=2048, window=256
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    source = folder.parent / f"tokenizer-{family}"
    if not source.exists():
        tiny.build(family, source)
    AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    return folder


def prompt_ids(folder: Path) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = "The tenant shall keep the premises in good repair and return them in the same condition. " * 8
    return tokenizer(text).input_ids[:PROMPT_TOKENS]


def transformers_speed(folder: Path, ids: list[int]) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    inputs = torch.tensor([ids])
    best = 0.0
    for _ in range(REPEATS):
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0
            )
        assert out.shape[1] - len(ids) == NEW_TOKENS
        best = max(best, NEW_TOKENS / (time.perf_counter() - start))
    return best


def runtime_speed(module, folder: Path, ids: list[int]) -> float:
    runtime = module.load(folder)
    best = 0.0
    try:
        for _ in range(REPEATS):
            start = time.perf_counter()
            tokens = runtime.greedy(ids, NEW_TOKENS)
            assert len(tokens) == NEW_TOKENS
            best = max(best, NEW_TOKENS / (time.perf_counter() - start))
    finally:
        runtime.close()
    return best


def measured(record: dict) -> str:
    """The gate's numbers in a few words: logit difference at full precision, agreement and gap when quantized."""
    gate = record["gate"]
    if gate["precision"] == "full":
        return f"max |dlogit| {gate['max_abs_diff']:.1e}, greedy {gate['greedy_identical']}/{len(gate['prompts'])}"
    return (
        f"top-1 {gate['top1_agreement']:.1%} ({gate['top1_agreement_all_positions']:.1%} all), "
        f"gap {gate['mean_logprob_gap']:.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="gpt-neo-125m,pythia-160m")
    parser.add_argument("--quants", default=None, help="comma-separated quant types (default: all per format)")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args()

    from finetune import console as cli
    from finetune.errors import FinetuneError
    from finetune.export import command, formats

    family_of = {"neo": "gpt_neo", "neox": "gpt_neox", "gptj": "gptj"}
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        for shape in args.shapes.split(","):
            folder = build(shape, Path(tmp) / shape)
            ids = prompt_ids(folder)
            baseline = transformers_speed(folder, ids)
            size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
            rows.append((shape, "transformers", "fp32", size, baseline, 1.0, "reference", ""))
            for name in formats.available(family_of[SHAPES[shape][0]]):
                fmt = formats.FORMATS[name]
                module = formats.module(fmt)
                for quant in args.quants.split(",") if args.quants else module.QUANTS:
                    if quant not in module.QUANTS:
                        continue
                    out = Path(tmp) / f"{shape}-{name}-{quant}"
                    try:
                        command.run(
                            cli.parse(
                                [str(folder), f"format={name}", f"quant={quant}", f"out={out}", "tokens=8"],
                                command.OPTIONS,
                                "target",
                            )
                        )
                        verdict = "passed"
                    except FinetuneError as err:
                        verdict, out = f"FAILED ({str(err)[:60]})", out.with_name(out.name + ".invalid")
                    record = json.loads((out / "export.json").read_text())
                    exported = sum(f["bytes"] for f in record["files"] if not f["name"].startswith("tokenizer"))
                    speed = runtime_speed(module, out, ids)
                    rows.append(
                        (shape, fmt.engine, quant, exported, speed, speed / baseline, verdict, measured(record))
                    )
    print(f"\nbatch 1, {PROMPT_TOKENS}-token prompt, {NEW_TOKENS} greedy tokens, best of {REPEATS}, CPU")
    print(
        f"{'shape':<14} {'runtime':<14} {'type':<13} {'size MiB':>9} {'tok/s':>8} {'vs transformers':>16}  "
        "gate: what it measured"
    )
    for shape, engine, quant, size, speed, ratio, verdict, measure in rows:
        print(
            f"{shape:<14} {engine:<14} {quant:<13} {size / 2**20:>9.1f} {speed:>8.1f} {ratio:>15.2f}x  {verdict}"
            + (f": {measure}" if measure else "")
        )
    for shape in args.shapes.split(","):
        best = max(
            (r for r in rows if r[0] == shape and r[1] != "transformers" and r[6] == "passed"), key=lambda r: r[4]
        )
        print(f"{shape}: fastest gated runtime {best[1]} {best[2]}: {best[5]:.2f}x transformers fp32 (target >= 3x)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
