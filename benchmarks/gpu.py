"""LoRA tokens/s and MFU on one GPU: `python -m finetune` vs the plain TRL recipe, measured in the same run.

    python benchmarks/gpu.py --shapes neo-1.3b                 # one shape per call keeps each under ~10 minutes
    python benchmarks/gpu.py --shapes pythia-6.9b
    python benchmarks/gpu.py --shapes neox-20b-8l              # NeoX-20B's layer shape, 8 of its 44 layers
    # the script itself, on CPU:
    python benchmarks/gpu.py --device cpu --shapes tiny-neo,tiny-neox --seq 512 --batch 2 --warmup 2 --steps 4

Models: random weights of the real shapes (transformers' own GPTNeo / GPTNeoX config classes with the published
sizes, the real vocabulary rows), written once as bf16 safetensors into `--cache`, with the tiny byte-level BPE of
`finetune.tiny` as tokenizer (the Hub is out of reach; the tokenizer only decides which ids the rows hold).
`neox-20b-8l` keeps NeoX-20B's width, heads, MLP and head but 8 of its 44 layers, so one call fits the device's
time limit; MFU per layer is what it measures (the LM head is a larger share than in the full model).

Data: the bundled demo rows (Alpaca fields) cycled, each made unique by its row number, enough for every step.
Sequence `--seq` (2048), packed on both sides, one GPU, micro-batch `--batch` per shape, no accumulation.

- ours: the real CLI, `python -m finetune model=<the shape's preset model> model.name_or_path=DIR data=alpaca
  data.max_length=SEQ data.packing=true trainer.max_steps=W+S trainer.logging_steps=L ...` with our defaults for
  the rest (bf16 on a bf16 GPU, LoRA r=16 on every projection, no checkpointing, our GPT-Neo attention, trl's LM
  head); no evaluation, samples or saving inside the timed steps. tokens/s: the `[finetune] step N/M ... tok/s`
  lines after the warm-up steps (non-padding input tokens per second of training).
- trl: `SFTTrainer(model=DIR, args=SFTConfig(per_device_train_batch_size=B, max_length=SEQ, packing=True, bf16=True,
  max_steps=W+S), peft_config=LoraConfig(r=8, lora_alpha=16, task_type="CAUSAL_LM"))` on a prompt/completion
  dataset, trl's defaults for the rest (gradient checkpointing on). If packing fails, the error is shown and the
  recipe runs again with packing=False. tokens/s: input tokens (attention-mask sum; all
  tokens when trl packs padding-free) of the steps after the warm-up, timed with the GPU synchronised.

MFU = tokens/s x model FLOPs per token / the GPU's dense bf16 peak (finetune.plan's table: H100 SXM 989 TFLOPs;
`--peak-tflops` for another part). Model FLOPs per token = 4N + 12*L*s*h: N = weights in matmuls (every Linear and
the LM head; the embedding lookup is not one), 2N forward and 2N backward through frozen weights (LoRA trains
almost nothing), attention's QK^T and AV at the full sequence s (no causal or packing discount, as Megatron and
PaLM count). Recompute (checkpointing) is not counted: it is work, not model FLOPs. Peak GPU memory is
torch.cuda.max_memory_allocated of each process.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
DEMO = PROJECT / "finetune" / "demo_data" / "legal_medical_qa.jsonl"
sys.path.insert(0, str(PROJECT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from data import demo_rows  # noqa: E402 - benchmarks/ is on sys.path only from here
from train import LAUNCHER as _CPU_LAUNCHER  # noqa: E402
from train import _env, _last_error, prompt, source_state, vmhwm  # noqa: E402

# name: (architecture, our preset model file, config keyword arguments, default micro-batch at seq 2048)
SHAPES = {
    "neo-1.3b": (
        "neo",
        "gpt_neo_1.3b",
        {
            "vocab_size": 50257,
            "hidden_size": 2048,
            "num_layers": 24,
            "num_heads": 16,
            "attention_types": [[["global", "local"], 12]],
            "window_size": 256,
            "max_position_embeddings": 2048,
        },
        8,
    ),
    "pythia-6.9b": (
        "neox",
        "pythia_6.9b",
        {
            "vocab_size": 50432,
            "hidden_size": 4096,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "intermediate_size": 16384,
            "rotary_pct": 0.25,
            "max_position_embeddings": 2048,
            "use_parallel_residual": True,
        },
        4,
    ),
    "neox-20b-8l": (
        "neox",
        "gpt_neox_20b",
        {
            "vocab_size": 50432,
            "hidden_size": 6144,
            "num_hidden_layers": 8,
            "num_attention_heads": 64,
            "intermediate_size": 24576,
            "rotary_pct": 0.25,
            "max_position_embeddings": 2048,
            "use_parallel_residual": True,
        },
        4,
    ),
    # The script itself on CPU (the shapes of finetune.tiny: 4 layers x 128, window 32).
    "tiny-neo": (
        "neo",
        "tiny_neo",
        {
            "vocab_size": 1024,
            "hidden_size": 128,
            "num_layers": 4,
            "num_heads": 4,
            "attention_types": [[["global", "local"], 2]],
            "window_size": 32,
            "max_position_embeddings": 2048,
        },
        2,
    ),
    "tiny-neox": (
        "neox",
        "tiny_neox",
        {
            "vocab_size": 1024,
            "hidden_size": 128,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "intermediate_size": 512,
            "rotary_pct": 0.25,
            "max_position_embeddings": 2048,
            "use_parallel_residual": True,
        },
        2,
    ),
}


def table_peak(device_name: str) -> float | None:
    """Dense bf16 TFLOPs of the device from finetune.plan's GPU table: the entry whose family (h100, a100, ...) the
    CUDA name holds, and whose memory is nearest the device's."""
    import torch

    from finetune.plan.hardware import GPUS

    name, memory = device_name.lower().replace(" ", ""), torch.cuda.get_device_properties(0).total_memory / 2**30
    matches = [g for g in GPUS.values() if g.key != "cpu" and g.key.split("-")[0] in name and g.bf16_tflops]
    return min(matches, key=lambda g: abs(g.memory_gib - memory)).bf16_tflops if matches else None


# Our CLI in this process as `-m` runs it, writing peak RSS and peak CUDA memory at exit.
LAUNCHER = _CPU_LAUNCHER.replace(
    "atexit.register(_peak)",
    "atexit.register(_peak)\n"
    "def _cuda():\n"
    '    torch = sys.modules.get("torch")\n'
    "    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():\n"
    '        open(os.environ["BENCH_PEAK_FILE"] + ".cuda", "w").write(str(torch.cuda.max_memory_allocated()))\n'
    "atexit.register(_cuda)",
)


# ---------------------------------------------------------------- fixtures


def config_of(shape: str):
    from transformers import GPTNeoConfig, GPTNeoXConfig

    arch, _, kwargs, _ = SHAPES[shape]
    ids = {"bos_token_id": 0, "eos_token_id": 0}  # finetune.tiny's tokenizer: EOS is token 0 (NeoX pads with 1)
    return GPTNeoConfig(**kwargs, **ids) if arch == "neo" else GPTNeoXConfig(**kwargs, **ids, pad_token_id=1)


def build_checkpoint(shape: str, folder: Path, device: str) -> Path:
    """Random bf16 weights of the shape (initialised on the device: seconds, not minutes) + the tiny tokenizer."""
    marker = folder / "gpu_bench.json"
    if marker.is_file() and json.loads(marker.read_text()).get("shape") == shape:
        return folder
    import torch
    from transformers import AutoModelForCausalLM

    from finetune.models import tiny

    arch = SHAPES[shape][0]
    print(f"building {folder} (random weights, {shape})", file=sys.stderr, flush=True)
    texts = tiny._corpus_texts(DEMO)
    tokenizer = tiny.train_tokenizer(arch, texts, 1024, SHAPES[shape][2]["max_position_embeddings"])
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config_of(shape), dtype=dtype)
    if folder.exists():
        shutil.rmtree(folder)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    marker.write_text(json.dumps({"shape": shape}))
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return folder


def model_flops_per_token(shape: str, seq: int) -> tuple[float, int]:
    """(4N + 12*L*s*h, N): N counted on a meta-device model of the shape (every Linear, plus the LM head)."""
    import torch
    from transformers import AutoModelForCausalLM

    config = config_of(shape)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    n = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))  # lm_head is a Linear
    layers = getattr(config, "num_layers", None) or config.num_hidden_layers
    return 4 * n + 12 * layers * seq * config.hidden_size, n


def write_rows(path: Path, n: int) -> None:
    """n Alpaca rows: the demo rows cycled, each made unique by its row number (benchmarks/data.py's rows)."""
    path.write_text("".join(json.dumps(row) + "\n" for row in demo_rows(n, "alpaca")), encoding="utf-8")


# ---------------------------------------------------------------- the trl side (a subprocess)


def trl_worker(
    model: str, data: str, out: str, seq: int, batch: int, warmup: int, steps: int, packing: bool, cpu: bool
) -> None:
    """The plain TRL recipe; prints one JSON line: tokens and seconds of the steps after the warm-up."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    eos = AutoTokenizer.from_pretrained(model).eos_token
    rows = [json.loads(line) for line in Path(data).read_text(encoding="utf-8").splitlines() if line.strip()]
    dataset = Dataset.from_list([{"prompt": prompt(r), "completion": r["output"] + eos} for r in rows])
    args = SFTConfig(
        output_dir=out,
        per_device_train_batch_size=batch,
        max_length=seq,
        packing=packing,
        bf16=not cpu,
        use_cpu=cpu,
        max_steps=warmup + steps,
        logging_steps=max(1, steps),
        report_to="none",
        save_strategy="no",
    )
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=dataset, peft_config=LoraConfig(r=8, lora_alpha=16, task_type="CAUSAL_LM")
    )
    seen = [0]
    collate = trainer.data_collator

    def counting(features):
        batch_ = collate(features)
        mask = batch_.get("attention_mask")
        seen[0] += int(mask.sum()) if mask is not None else batch_["input_ids"].numel()  # padding-free: no padding
        return batch_

    trainer.data_collator = counting
    marks = {}

    def sync():
        if torch.cuda.is_available() and not cpu:
            torch.cuda.synchronize()

    class Window(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == warmup:
                sync()
                marks["begin"] = (time.perf_counter(), seen[0])

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == warmup + steps:
                sync()
                marks["end"] = (time.perf_counter(), seen[0])

    trainer.add_callback(Window())
    trainer.train()
    (t0, n0), (t1, n1) = marks["begin"], marks["end"]
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() and not cpu else None
    print(
        json.dumps(
            {
                "tokens": n1 - n0,
                "seconds": t1 - t0,
                "packing": packing,
                "peak_cuda": peak,
                "peak_rss": vmhwm(),
                "gradient_checkpointing": bool(args.gradient_checkpointing),
                "bf16": bool(args.bf16),
                "dtype": str(next(trainer.model.parameters()).dtype).removeprefix("torch."),
            }
        )
    )


def run_trl(model_dir: Path, data: Path, out: Path, a, packing: bool) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    log = out / "worker.log"
    command = [
        sys.executable,
        __file__,
        "--worker",
        "--model",
        str(model_dir),
        "--data",
        str(data),
        "--out",
        str(out),
        "--seq",
        str(a.seq),
        "--batch",
        str(a.batch_now),
        "--warmup",
        str(a.warmup),
        "--steps",
        str(a.steps),
        "--packing",
        str(int(packing)),
        "--device",
        a.device,
    ]
    with log.open("w") as stderr:
        result = subprocess.run(
            command, cwd=PROJECT, stdout=subprocess.PIPE, stderr=stderr, text=True, check=False, env=_env()
        )
    if result.returncode:
        return {"failed": _last_error(log.read_text(errors="replace")), "log": str(log)}
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- our side: the real CLI

STEP_LINE = re.compile(r"\[finetune\] step (\d+)/\d+ .*?([\d,]+) tok/s")


def run_ours(shape: str, model_dir: Path, train: Path, heldout: Path, out: Path, a) -> dict:
    preset_model = SHAPES[shape][1]
    overrides = [
        f"model={preset_model}",
        f"model.name_or_path={model_dir}",
        "model.tiny=null",
        "model.hub_id=null",
        "data=alpaca",
        f"data.path={train}",
        f"data.eval_path={heldout}",
        f"data.max_length={a.seq}",
        "data.packing=true",
        f"trainer.per_device_train_batch_size={a.batch_now}",
        "trainer.gradient_accumulation_steps=1",
        f"trainer.max_steps={a.warmup + a.steps}",
        f"trainer.logging_steps={a.log_every}",
        "trainer.save_strategy=no",
        "trainer.eval_strategy=no",
        "trainer.report_to=none",
        "eval_before_training=false",
        "sample_generations=0",
        f"output_dir={out}",
        "overwrite=true",
    ]
    if a.device == "cpu":
        overrides += ["model.dtype=float32", "trainer.bf16=false"]
    peak_file = out.parent / f"{out.name}.peak"
    log = out.parent / f"{out.name}.log"
    with log.open("w") as output:
        result = subprocess.run(
            [sys.executable, "-c", LAUNCHER, *overrides],
            cwd=PROJECT,
            stdout=output,
            stderr=subprocess.STDOUT,
            check=False,
            env={**_env(), "BENCH_PEAK_FILE": str(peak_file)},
        )
    text = log.read_text(errors="replace")
    if result.returncode:
        return {"failed": _last_error(text), "log": str(log)}
    rates = [float(rate.replace(",", "")) for step, rate in STEP_LINE.findall(text) if int(step) > a.warmup]
    if not rates:
        return {"failed": f"no '[finetune] step N/M ... tok/s' line after step {a.warmup} in {log}", "log": str(log)}
    cuda_file = Path(f"{peak_file}.cuda")
    import yaml

    config = yaml.safe_load((out / "config.yaml").read_text())
    return {
        "tokens_per_second": statistics.harmonic_mean(rates),
        "intervals": len(rates),
        "packing": True,
        "peak_cuda": int(cuda_file.read_text()) if cuda_file.is_file() else None,
        "peak_rss": int(peak_file.read_text()),
        "gradient_checkpointing": bool(config["trainer"].get("gradient_checkpointing")),
        "bf16": bool(config["trainer"].get("bf16")),
        "dtype": config["model"]["dtype"],
        "attention": config["model"].get("attn_implementation"),
    }


# ---------------------------------------------------------------- report


def gib(value) -> str:
    return f"{value / 2**30:.1f} GiB" if value else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--shapes", default="neo-1.3b,pythia-6.9b,neox-20b-8l", help=f"comma-separated: {', '.join(SHAPES)}"
    )
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument(
        "--batch", type=int, default=None, help="micro-batch for every shape (default: per shape, 8 / 4 / 4)"
    )
    parser.add_argument("--warmup", type=int, default=5, help="steps run but not timed")
    parser.add_argument("--steps", type=int, default=20, help="timed steps after the warm-up")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="the GPU's dense bf16 peak (default: finetune.plan's table for this GPU; H100 989)",
    )
    parser.add_argument("--sides", default="ours,trl")
    parser.add_argument(
        "--cache",
        default=None,
        help="checkpoints, built once (default: $NEO_FINETUNE_CACHE/gpu-bench or ~/.cache/neo-finetune/gpu-bench)",
    )
    parser.add_argument(
        "--workdir", default=None, help="keep data, logs and run folders here (default: a temporary folder, removed)"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--packing", type=int, default=1, help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.worker:
        trl_worker(a.model, a.data, a.out, a.seq, a.batch, a.warmup, a.steps, bool(a.packing), a.device == "cpu")
        return
    shapes = [s for s in a.shapes.split(",") if s]
    if set(shapes) - set(SHAPES):
        parser.error(f"--shapes: choose from {', '.join(SHAPES)}")
    a.log_every = a.warmup if a.warmup > 0 and a.steps % a.warmup == 0 else 1  # log lines fall on the warm-up boundary
    import torch

    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: this benchmark is for a GPU (--device cpu runs the script itself on tiny shapes)")
    gpu = torch.cuda.get_device_name(0) if a.device == "cuda" else "CPU"
    peak = a.peak_tflops or (table_peak(gpu) if a.device == "cuda" else None)
    cache = Path(
        a.cache or Path(os.environ.get("NEO_FINETUNE_CACHE", Path.home() / ".cache" / "neo-finetune")) / "gpu-bench"
    )
    work = Path(a.workdir or tempfile.mkdtemp(prefix="gpu-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    results = []
    try:
        for shape in shapes:
            a.batch_now = a.batch or SHAPES[shape][3]
            model_dir = build_checkpoint(shape, cache / shape, a.device)
            per_row = 300  # demo rows are ~270 tokens in the tiny tokenizer; 1.5x margin below
            rows = int(1.5 * (a.warmup + a.steps + 2) * a.batch_now * a.seq / per_row) + 64
            train, heldout = work / f"{shape}-train.jsonl", work / f"{shape}-heldout.jsonl"
            write_rows(train, rows)
            write_rows(heldout, 8)
            flops, n = model_flops_per_token(shape, a.seq)
            for side in [s for s in a.sides.split(",") if s]:
                t = time.perf_counter()
                if side == "ours":
                    measured = run_ours(shape, model_dir, train, heldout, work / f"{shape}-ours", a)
                else:
                    measured = run_trl(model_dir, train, work / f"{shape}-trl", a, packing=True)
                    if "failed" in measured:
                        print(f"trl packing=True failed: {measured['failed']}; running packing=False", file=sys.stderr)
                        measured = {
                            **run_trl(model_dir, train, work / f"{shape}-trl-unpacked", a, packing=False),
                            "packing_error": measured["failed"],
                        }
                    if "tokens" in measured:
                        measured["tokens_per_second"] = measured["tokens"] / measured["seconds"]
                if "tokens_per_second" in measured and peak:
                    measured["mfu"] = measured["tokens_per_second"] * flops / (peak * 1e12)
                state = measured.get("failed") or f"{measured['tokens_per_second']:,.0f} tokens/s"
                print(f"{shape} {side}: {state} ({time.perf_counter() - t:.0f} s)", file=sys.stderr, flush=True)
                results.append(
                    {
                        "shape": shape,
                        "side": side,
                        "batch": a.batch_now,
                        "flops_per_token": flops,
                        "matmul_params": n,
                        "measured": measured,
                    }
                )
        print(
            f"\nLoRA SFT on {gpu}, seq {a.seq} packed, {a.warmup} warm-up + {a.steps} timed steps; ours = "
            f"{source_state()}; "
            f"MFU against {peak or '?'} TFLOPs dense bf16\n"
        )
        print(
            "| shape | side | micro-batch | precision | packing | checkpointing | tokens/s | MFU | peak GPU memory | "
            "peak RSS |"
        )
        print("|---|---|---:|---|---|---|---:|---:|---:|---:|")
        for r in results:
            m = r["measured"]
            if "failed" in m:
                print(f"| {r['shape']} | {r['side']} | {r['batch']} | failed: {m['failed']} | | | | | | |")
                continue
            precision = f"{m['dtype']} weights{', bf16 autocast' if m['bf16'] else ''}"
            mfu = f"{m['mfu']:.1%}" if "mfu" in m else "-"
            print(
                f"| {r['shape']} | {r['side']} | {r['batch']} | {precision} | {'yes' if m['packing'] else 'no'} | "
                f"{'on' if m['gradient_checkpointing'] else 'off'} | {m['tokens_per_second']:,.0f} | {mfu} | "
                f"{gib(m['peak_cuda'])} | "
                f"{gib(m['peak_rss'])} |"
            )
        print()
        for shape in shapes:
            pair = {r["side"]: r["measured"] for r in results if r["shape"] == shape and "failed" not in r["measured"]}
            flops = next(r["flops_per_token"] for r in results if r["shape"] == shape)
            n = next(r["matmul_params"] for r in results if r["shape"] == shape)
            size = f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"
            line = f"{shape}: N = {size} in matmuls, {flops / 1e9:.3g} GFLOP per token"
            if "ours" in pair and "trl" in pair:
                ratio = pair["ours"]["tokens_per_second"] / pair["trl"]["tokens_per_second"]
                line += f"; ours / trl tokens/s = {ratio:.2f}x"
            if "mfu" in pair.get("ours", {}):
                line += f"; ours MFU {pair['ours']['mfu']:.1%} (target >= 45%)"
            print(line)
        for r in results:
            if "packing_error" in r["measured"]:
                print(f"{r['shape']} trl packing=True failed: {r['measured']['packing_error']}")
            if "failed" in r["measured"]:
                print(f"{r['shape']} {r['side']} failed (log: {r['measured']['log']}): {r['measured']['failed']}")
        (work / "results.json").write_text(json.dumps(results, indent=2, default=str))
        print(
            f"\ntotal {time.perf_counter() - began:.0f} s" + (f"; logs and results.json in {work}" if a.workdir else "")
        )
    finally:
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
