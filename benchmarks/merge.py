"""Peak memory and time of `python -m finetune.merge` vs peft's merge_and_unload, measured in the same run.

    python benchmarks/merge.py                      # GPT-Neo-2.7B shape, bf16, 1 GB shards (~16 GB of disk)
    python benchmarks/merge.py --shape 125m         # a quick check of the script itself

Builds a random-weight checkpoint of the chosen GPT-Neo shape (written tensor by tensor in several safetensors
shards, as published checkpoints are) and a random LoRA r=16 adapter on every attention and MLP projection, then
merges it twice, each in a fresh process:
- ours: `python -m finetune.merge ADAPTER base=BASE dtype=bfloat16` (streaming, then its numerical gate);
- peft: `AutoModelForCausalLM.from_pretrained` + `PeftModel.from_pretrained` + `merge_and_unload` +
  `save_pretrained` with the same shard size (the standard recipe).
Prints a table (peak RSS = VmHWM of each process, wall time) and the ratio ours / peft (target <= 0.25),
then projects both to GPT-NeoX-20B from the measured overhead and the largest tensor.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
SHAPES = {  # GPT-Neo family shapes (hidden, layers, heads)
    "125m": (768, 12, 12),
    "1.3b": (2048, 24, 16),
    "2.7b": (2560, 32, 20),
}
VOCAB, POSITIONS = 50257, 2048
TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "c_fc", "c_proj"]
NEOX_20B = {"hidden": 6144, "layers": 44, "vocab": 50432, "shards": 46, "bytes_bf16": 41.3e9}

PEFT_SIDE = """
import json, sys, time, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
from finetune.adapters.merge import peak_rss_bytes
base, adapter, out, shard = sys.argv[1:5]
t = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out, max_shard_size=shard)
print(json.dumps({"seconds": time.perf_counter() - t, "peak_rss": peak_rss_bytes()}))
"""


def build_checkpoint(folder: Path, shape: str, shard_bytes: int) -> dict:
    """Random bf16 weights of a GPT-Neo shape, in shards of about shard_bytes, plus config and a tokenizer."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPTNeoConfig

    from finetune.models import tiny

    hidden, layers, heads = SHAPES[shape]
    config = GPTNeoConfig(
        vocab_size=VOCAB,
        max_position_embeddings=POSITIONS,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        attention_types=[[["global", "local"], layers // 2]],
        window_size=256,
        intermediate_size=4 * hidden,
        dtype="bfloat16",
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    names = {n: tuple(t.shape) for n, t in model.state_dict().items() if n != "lm_head.weight"}  # tied to wte
    folder.mkdir(parents=True)
    groups, current, size = [], [], 0
    for name, shp in names.items():
        nbytes = math.prod(shp) * 2
        if current and size + nbytes > shard_bytes:
            groups.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    groups.append(current)
    generator = torch.Generator().manual_seed(0)
    weight_map = {}
    for i, group in enumerate(groups, 1):
        file = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        tensors = {n: _random(names[n], generator) for n in group}
        save_file(tensors, folder / file, metadata={"format": "pt"})
        weight_map.update({n: file for n in group})
        del tensors
    total = sum((folder / f).stat().st_size for f in set(weight_map.values()))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    config.save_pretrained(folder)
    tiny_tokenizer = folder.parent / "tokenizer-source"
    tiny.build("neo", tiny_tokenizer)
    AutoTokenizer.from_pretrained(tiny_tokenizer).save_pretrained(folder)
    largest = max(math.prod(s) for s in names.values())
    return {
        "parameters": sum(math.prod(s) for s in names.values()),
        "shards": len(groups),
        "bytes": total,
        "largest_tensor_elements": largest,
    }


def _random(shape, generator):
    import torch

    return (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)


def build_adapter(base: Path, folder: Path, r: int = 16) -> int:
    """A LoRA adapter with random A and B for every target in every block, in PEFT layout."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file

    config = json.loads((base / "config.json").read_text())
    hidden, layers = config["hidden_size"], config["num_layers"]
    shapes = {
        "q_proj": (hidden, hidden),
        "k_proj": (hidden, hidden),
        "v_proj": (hidden, hidden),
        "out_proj": (hidden, hidden),
        "c_fc": (4 * hidden, hidden),
        "c_proj": (hidden, 4 * hidden),
    }
    generator = torch.Generator().manual_seed(1)
    tensors = {}
    for layer in range(layers):
        for target, (out_features, in_features) in shapes.items():
            part = "attn.attention" if target.endswith("proj") and target != "c_proj" else "mlp"
            prefix = f"base_model.model.transformer.h.{layer}.{part}.{target}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(r, in_features, generator=generator) / math.sqrt(
                in_features
            )
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_features, r, generator=generator) * 0.01
    folder.mkdir(parents=True)
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    LoraConfig(
        r=r, lora_alpha=2 * r, target_modules=TARGETS, task_type="CAUSAL_LM", base_model_name_or_path=base.name
    ).save_pretrained(folder)
    return sum(t.numel() for t in tensors.values())


def run_ours(base: Path, adapter: Path, out: Path) -> dict:
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "finetune.merge", str(adapter), f"base={base}", f"out={out}", "dtype=bfloat16"],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode:
        sys.exit(f"our merge failed:\n{result.stderr[-3000:]}")
    report = json.loads((out / "merge_report.json").read_text())
    return {
        "seconds": time.perf_counter() - started,
        "peak_rss": report["peak_rss_bytes"],
        "gate": report["gate"],
        "merge_peak_rss": report["merge_peak_rss_bytes"],
        "merge_seconds": report["merge_seconds"],
    }


def run_peft(base: Path, adapter: Path, out: Path, shard: str) -> dict:
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", PEFT_SIDE, str(base), str(adapter), str(out), shard],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode:
        sys.exit(f"peft merge failed:\n{result.stderr[-3000:]}")
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    return {"seconds": time.perf_counter() - started, "peak_rss": measured["peak_rss"]}


def idle_rss() -> int:
    """RSS of a process that has imported what a merge imports, before touching weights (the fixed overhead)."""
    code = (
        "import torch, transformers, peft, safetensors\n"
        "from finetune.adapters.merge import peak_rss_bytes\nprint(peak_rss_bytes())"
    )
    return int(
        subprocess.run(
            [sys.executable, "-c", code], cwd=PROJECT, capture_output=True, text=True, check=True
        ).stdout.strip()
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=SHAPES, default="2.7b")
    parser.add_argument("--shard-gb", type=float, default=1.0)
    parser.add_argument("--workdir", default=None, help="where to write the checkpoints (default: a temporary folder)")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="merge-bench-"))
    try:
        base = work / f"gpt-neo-{args.shape}-random"
        t = time.perf_counter()
        saved = work / "facts.json"
        if saved.is_file():  # --workdir of an earlier run: reuse its checkpoint and adapter
            facts, lora = json.loads(saved.read_text()), json.loads(saved.read_text())["adapter_parameters"]
        else:
            facts = build_checkpoint(base, args.shape, int(args.shard_gb * 1e9))
            lora = build_adapter(base, work / "adapter")
            saved.write_text(json.dumps({**facts, "adapter_parameters": lora}))
        print(
            f"built {base.name}: {facts['parameters'] / 1e9:.2f} B parameters, {facts['shards']} shards, "
            f"{facts['bytes'] / 1e9:.2f} GB bf16; adapter {lora / 1e6:.1f} M parameters ({time.perf_counter() - t:.0f} "
            "s)"
        )
        overhead = idle_rss()
        ours = run_ours(base, work / "adapter", work / "merged-ours")
        shutil.rmtree(work / "merged-ours")
        peft = run_peft(base, work / "adapter", work / "merged-peft", f"{int(args.shard_gb * 1000)}MB")
        ratio = ours["peak_rss"] / peft["peak_rss"]
        print()
        print(f"| merge of GPT-Neo-{args.shape} (bf16, LoRA r=16) | peak RSS | wall time |")
        print("|---|---|---|")
        print(
            f"| neo-finetune streaming merge + {ours['gate']['mode']} gate | {ours['peak_rss'] / 2**30:.2f} GiB | "
            f"{ours['seconds']:.0f} s |"
        )
        print(
            f"| (its merge phase alone, before the gate) | {ours['merge_peak_rss'] / 2**30:.2f} GiB | "
            f"{ours['merge_seconds']:.0f} s |"
        )
        print(
            f"| peft merge_and_unload + save_pretrained | {peft['peak_rss'] / 2**30:.2f} GiB | {peft['seconds']:.0f} s "
            "|"
        )
        print(f"| process after imports, no weights | {overhead / 2**30:.2f} GiB | |")
        print(
            f"\nratio ours / peft peak RSS: {ratio:.3f} (target <= 0.25); "
            f"gate {ours['gate']['mode']}: max diff {ours['gate']['max_abs_diff']:.2e} <= "
            f"{ours['gate']['tolerance']:.2e}"
        )
        # projection: ours = overhead + k x largest tensor (fp32 working copies), peft = overhead + whole model
        k = (ours["peak_rss"] - overhead) / (facts["largest_tensor_elements"] * 4)
        largest_20b = NEOX_20B["vocab"] * NEOX_20B["hidden"]
        mlp_20b = 4 * NEOX_20B["hidden"] * NEOX_20B["hidden"]
        ours_20b = overhead + k * max(largest_20b, mlp_20b) * 4
        peft_20b = overhead + (peft["peak_rss"] - overhead) / facts["bytes"] * NEOX_20B["bytes_bf16"]
        print(
            f"\nGPT-NeoX-20B projection ({NEOX_20B['shards']} shards of "
            f"~{NEOX_20B['bytes_bf16'] / NEOX_20B['shards'] / 1e9:.2f} GB, "
            f"largest tensor {largest_20b * 2 / 1e9:.2f} GB bf16): ours ~{ours_20b / 2**30:.1f} GiB "
            f"(overhead + {k:.1f} x largest tensor in fp32), peft ~{peft_20b / 2**30:.1f} GiB"
        )
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.path.insert(0, str(PROJECT))
    main()
