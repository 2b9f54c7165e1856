"""Measured peak memory of real training steps vs the estimate of `python -m finetune.plan`, case by case.

    python benchmarks/plan_accuracy.py                # CPU, fp32: tiny Neo/NeoX/GPT-J, GPT-Neo-125M / Pythia-160M
    python benchmarks/plan_accuracy.py --cases tiny       # the tiny models only (about a minute)
    python benchmarks/plan_accuracy.py --device cuda  # GPU, bf16 autocast: GPT-Neo-1.3B and GPT-NeoX-20B, LoRA

Each case is a config composed as training composes it (a preset plus overrides). The planner plans it on
`gpu=cpu` (or the GPU named by --gpu); a fresh subprocess then builds the same architecture (tiny: the checkpoint
finetune.tiny writes; Hub shapes: random weights from the shipped config.json, nothing downloaded), wraps it with
peft from the same strategy section, patches trl's fused LM head as SFTTrainer does, turns on gradient checkpointing
the way the Trainer does (non-reentrant, input gradients for peft), and runs optimizer steps of `--accum`
micro-batches with fused AdamW, gradient clipping and zero_grad(set_to_none), on rows of random tokens as long as
max_length except the last, which ends in padding (so the batch is padded and masked, as SFT batches are).

First, per layer: the bytes the tensors kept for backward occupy (torch.autograd.graph.saved_tensors_hooks, each
storage once, parameters excluded; 4 layers minus 2, halved) in tiny Neo/NeoX/GPT-J models, full and LoRA, against
the planner's layer term, on the chosen device and precision (CUDA: bf16 weights under bf16 autocast).

Then the peaks. Measured: on CPU the rise of the process's peak resident memory (VmHWM, reset through
/proc/self/clear_refs after
the imports) over its resident memory just before the model is built; on CUDA torch.cuda.max_memory_allocated over
the allocation before the model is built. The planner's fixed CUDA context is left out of the comparison (neither
measure includes it). Prints a table with the error of each estimate; the target is within 15%.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))
TARGET_ERROR = 0.15

# (name, model overrides, strategy, micro-batch, max_length, gradient checkpointing); tiny models are built per run
CPU_CASES = {
    "tiny": [
        ("tiny Neo, LoRA", "tiny:neo", "lora", 8, 512, False),
        ("tiny Neo, full", "tiny:neo", "full", 8, 512, False),
        ("tiny NeoX, LoRA", "tiny:neox", "lora", 8, 512, False),
        ("tiny NeoX, full + ckpt", "tiny:neox", "full", 8, 512, True),
        ("tiny GPT-J, LoRA", "tiny:gptj", "lora", 8, 512, False),
        ("tiny GPT-J, LoRA + ckpt", "tiny:gptj", "lora", 8, 512, True),
    ],
    "125m": [
        ("GPT-Neo-125M, LoRA", "model=gpt_neo_125m", "lora", 2, 512, False),
        ("GPT-Neo-125M, LoRA + ckpt", "model=gpt_neo_125m", "lora", 2, 512, True),
        ("GPT-Neo-125M, full", "model=gpt_neo_125m", "full", 2, 512, False),
        ("Pythia-160M, LoRA", "model=pythia_160m", "lora", 4, 256, False),
        ("Pythia-160M, full + ckpt", "model=pythia_160m", "full", 4, 256, True),
    ],
}
CUDA_CASES = {
    "gpu": [
        ("GPT-Neo-1.3B, LoRA", "model=gpt_neo_1.3b", "lora", 4, 1024, False),
        ("GPT-Neo-1.3B, LoRA + ckpt", "model=gpt_neo_1.3b", "lora", 4, 1024, True),
        ("GPT-NeoX-20B, LoRA + ckpt", "model=gpt_neox_20b", "lora", 2, 2048, True),
    ],
}
TINY_CONFIG = {"neo": "tiny_neo", "neox": "tiny_neox", "gptj": "tiny_gptj"}
PADDING = 16  # padding tokens at the end of each batch's last row
# glibc keeps freed blocks below its (self-raising) mmap threshold in the heap, so resident memory stops tracking live
# tensors; a fixed 64 KiB threshold hands every tensor-sized block back to the kernel when it is freed.
WORKER_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "MALLOC_MMAP_THRESHOLD_": "65536",
    "MALLOC_TRIM_THRESHOLD_": "131072",
}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python benchmarks/plan_accuracy.py", description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--cases", default=None, help="comma-separated case groups: tiny, 125m (CPU); gpu (CUDA)")
    parser.add_argument("--gpu", default="h100-80gb", help="the planner's gpu= for --device cuda")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per case (the peak is the second's)")
    parser.add_argument("--accum", type=int, default=2, help="micro-batches per optimizer step")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    print_layer_table(args.device)
    groups = CPU_CASES if args.device == "cpu" else CUDA_CASES
    wanted = args.cases.split(",") if args.cases else list(groups)
    cases = [case for name in wanted for case in groups[name]]
    with tempfile.TemporaryDirectory(prefix="plan-accuracy-") as workdir:
        rows = [run_case(case, args, Path(workdir)) for case in cases]
    print_table(rows, args)


def run_case(case: tuple, args, workdir: Path) -> dict:
    name, model, strategy, batch, length, checkpointing = case
    overrides = case_overrides(model, strategy, batch, length, checkpointing, args, workdir)
    estimate = planner_estimate(overrides, args)
    spec = {"overrides": overrides, "device": args.device, "steps": args.steps, "accum": args.accum}
    started = time.perf_counter()
    out = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)],
        check=False,
        capture_output=True,
        text=True,
        cwd=PROJECT,
        env={**os.environ, **WORKER_ENV},
    )
    if out.returncode != 0:
        raise SystemExit(f"case {name} failed:\n{out.stderr[-3000:]}")
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    row = {
        "case": name,
        "tokens": f"{batch} x {length}",
        "estimate": estimate,
        **measured,
        "seconds": round(time.perf_counter() - started, 1),
    }
    row["error"] = (estimate["total"] - measured["peak"]) / measured["peak"]
    row["forward_error"] = (estimate["after_forward"] - measured["after_forward"]) / measured["after_forward"]
    print(
        f"{name}: estimate {estimate['total'] / 2**20:.0f} MiB, measured {measured['peak'] / 2**20:.0f} MiB "
        f"({row['error']:+.1%}); end of forward {row['forward_error']:+.1%}; {row['seconds']} s",
        file=sys.stderr,
        flush=True,
    )
    return row


def case_overrides(
    model: str, strategy: str, batch: int, length: int, checkpointing: bool, args, workdir: Path
) -> list[str]:
    """The config of a case, as command-line overrides of the demo preset."""
    overrides = []
    if model.startswith("tiny:"):
        from finetune.models import tiny

        arch = model.split(":", 1)[1]
        folder = workdir / f"tiny-{arch}"
        if not folder.exists():
            tiny.build(arch, folder)
        overrides += [f"model={TINY_CONFIG[arch]}", f"model.name_or_path={folder}", "model.tiny=null"]
    else:
        overrides.append(model)
    precision = (
        ["model.dtype=float32", "trainer.bf16=false"]
        if args.device == "cpu"
        else ["model.dtype=bfloat16", "trainer.bf16=true"]
    )
    return [
        *overrides,
        f"strategy={strategy}",
        *precision,
        f"trainer.per_device_train_batch_size={batch}",
        f"trainer.gradient_accumulation_steps={args.accum}",
        f"trainer.gradient_checkpointing={str(checkpointing).lower()}",
        f"data.max_length={length}",
        f"output_dir={workdir / 'run'}",
    ]


def planner_estimate(overrides: list[str], args) -> dict:
    """The planner's per-process total, without the fixed CUDA context (which neither measurement includes)."""
    from finetune.plan import planning as planner

    result = planner.plan_preset("demo", overrides, gpu="cpu" if args.device == "cpu" else args.gpu)
    lines = {line.name: line.bytes for line in result.memory}
    context = lines.pop("CUDA context (fixed)", 0)
    static = result.total_bytes - context - lines["activations"]
    return {
        "total": result.total_bytes - context,
        "activations": lines["activations"],
        "static": static,
        "after_forward": static + result.activations_kept_after_forward,
        "peak_at": result.activation_peak_at,
    }


# --- the worker: one case in a fresh process ---------------------------------------------------------------------


def worker(spec: dict) -> dict:
    import torch
    from omegaconf import OmegaConf

    from finetune import console as cli
    from finetune.config.compose import compose, to_container
    from finetune.models import strategy
    from finetune.plan.architecture import architecture_config

    cli.quiet_libraries()
    cfg = OmegaConf.create(to_container(compose("demo", spec["overrides"])))
    device = spec["device"]
    config, _ = architecture_config(OmegaConf.to_container(cfg.model))
    batch, length = cfg.trainer.per_device_train_batch_size, cfg.data.max_length
    inputs = torch.randint(0, config.vocab_size, (batch, length))
    warm_up_imports(cfg, config)
    measure = Peak(device)
    model = build_model(cfg, config, device)
    step_seconds, after_forward = train_steps(
        model, cfg, inputs.to(device), spec["steps"], spec["accum"], device, measure
    )
    return {
        "peak": measure.rise(),
        "after_forward": after_forward,
        "step_seconds": round(step_seconds, 2),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "lora_dropout": cfg.strategy.get("lora_dropout")
        if strategy.peft_config(OmegaConf.to_container(cfg.strategy))
        else None,
    }


def warm_up_imports(cfg, config) -> None:
    """Import everything building and training the model imports (model code, peft, trl's head) before the baseline,
    by building it once on the meta device: modules are not the planner's business."""
    import torch

    with torch.device("meta"):
        build_model(cfg, config, "meta", warm_up=True)
    gc.collect()


class Peak:
    """The rise of peak memory from the moment it is created (CPU: resident memory; CUDA: allocated memory)."""

    def __init__(self, device: str):
        import torch

        self.device = device
        gc.collect()
        if device == "cuda":
            torch.cuda.synchronize()
            self.baseline = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            reset_peak_rss()
            self.baseline = status_bytes("VmRSS")

    def now(self) -> int:
        """Memory in use now, over the baseline (CPU: resident; CUDA: allocated)."""
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.memory_allocated() - self.baseline
        return status_bytes("VmRSS") - self.baseline

    def rise(self) -> int:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.baseline
        return status_bytes("VmHWM") - self.baseline


def reset_peak_rss() -> None:
    """Linux: writing 5 to /proc/self/clear_refs resets VmHWM to the current resident size."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def build_model(cfg, config, device: str, warm_up: bool = False):
    """The architecture with its weights (a tiny checkpoint) or random weights (a Hub shape), wrapped as SFTTrainer
    wraps it: fused LM head, then peft, then gradient checkpointing."""
    import torch
    from omegaconf import OmegaConf
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from finetune.models import lm_head, neo_attention, strategy

    dtype = getattr(torch, cfg.model.dtype)
    attention = _loadable(cfg.model.attn_implementation, cfg.model.family)
    folder = Path(cfg.model.name_or_path).expanduser()
    if (folder / "config.json").is_file() and not warm_up:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation=attention).to(device)
    else:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attention)
    neo_attention.enable(model)  # as finetune.models.load_model does for GPT-Neo (no-op for the others)
    model.config.use_cache = False
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    peft_config = strategy.peft_config(OmegaConf.to_container(cfg.strategy, resolve=True))
    if peft_config is not None:
        model = get_peft_model(model, peft_config)
    lm_head.compact_everywhere(model)  # as GuardedSFTTrainer does
    if warm_up:
        return model
    if cfg.trainer.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if peft_config is not None:
            model.enable_input_require_grads()
    model.train()
    return model


def train_steps(model, cfg, input_ids, steps: int, accum: int, device: str, measure: Peak) -> tuple[float, int]:
    """Optimizer steps of `accum` micro-batches: loss as SFTTrainer computes it, fused AdamW, clipping at 1.0.
    Returns the seconds per step after the first and the memory in use at the end of the last forward."""
    import contextlib

    import torch

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=2e-4, weight_decay=0.0, fused=True)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device == "cuda" and cfg.trainer.bf16
        else contextlib.nullcontext()
    )
    mask = torch.ones_like(input_ids)
    mask[-1, -PADDING:] = 0  # a padded batch: transformers builds the attention mask a real SFT batch gets
    labels = input_ids.masked_fill(mask == 0, -100)
    started, after_forward = None, 0
    for step in range(steps):
        if step == 1:
            started = time.perf_counter()
        for _ in range(accum):
            with autocast:
                outputs = model(
                    input_ids=input_ids, attention_mask=mask, labels=labels, use_cache=False, fused_lm_head=True
                )
                loss = -outputs.log_probs.sum() / outputs.label_mask.sum().clamp(min=1) / accum
            after_forward = measure.now()
            loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return ((time.perf_counter() - started) / max(1, steps - 1) if started else 0.0), after_forward


# --- per-layer saved tensors ----------------------------------------------------------------------------------------


def print_layer_table(device: str) -> None:
    rows = [layer_row(arch, strategy, device) for arch in TINY_CONFIG for strategy in ("full", "lora")]
    print("| layer of | strategy | planner (MiB) | saved tensors (MiB) | error |")
    print("|---|---|---:|---:|---:|")
    for arch, strategy, planned, measured in rows:
        print(
            f"| tiny {arch} | {strategy} | {planned / 2**20:.3f} | {measured / 2**20:.3f} | "
            f"{(planned - measured) / measured:+.2%} |"
        )
    print(flush=True)


def layer_row(arch: str, strategy: str, device: str, batch: int = 4, length: int = 256) -> tuple:
    """The planner's bytes for one layer and the saved-tensor bytes of one real layer (4-layer model minus 2-layer)."""
    from finetune.config.compose import compose
    from finetune.plan.activations import layer_saved_bytes
    from finetune.plan.architecture import adapter as planned_adapter
    from finetune.plan.architecture import architecture
    from finetune.plan.checks import checked_config
    from finetune.plan.hardware import find_gpu
    from finetune.plan.setup import setup_of

    precision = (
        ["model.dtype=float32", "trainer.bf16=false"]
        if device == "cpu"
        else ["model.dtype=bfloat16", "trainer.bf16=true"]
    )
    overrides = [
        f"model={TINY_CONFIG[arch]}",
        f"strategy={strategy}",
        *precision,
        f"data.max_length={length}",
        f"trainer.per_device_train_batch_size={batch}",
    ]
    resolved, _ = checked_config(compose("demo", overrides))
    gpu = find_gpu("cpu" if device == "cpu" else "h100-80gb")
    arch_facts = architecture(resolved["model"])
    adapter = planned_adapter(resolved["model"], resolved["strategy"], arch_facts)
    setup = setup_of(resolved, gpu)
    planned = layer_saved_bytes(arch_facts, adapter, set(adapter.wrapped[0]) if adapter else set(), setup)
    kept = {layers: saved_tensor_bytes(resolved, arch, layers, batch, length, device) for layers in (2, 4)}
    return arch, strategy, planned, (kept[4] - kept[2]) / 2


def saved_tensor_bytes(resolved: dict, arch: str, layers: int, batch: int, length: int, device: str) -> int:
    """Bytes of the distinct storages autograd keeps after a forward of the backbone (parameters and buffers
    excluded)."""
    import contextlib

    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from finetune.models import neo_attention, strategy, tiny

    config = tiny.model_config(arch, layers=layers)
    dtype = getattr(torch, resolved["model"]["dtype"])
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(
            config,
            dtype=dtype,
            attn_implementation=_loadable(resolved["model"]["attn_implementation"], resolved["model"]["family"]),
        )
    neo_attention.enable(model)
    peft_config = strategy.peft_config(resolved["strategy"])
    if peft_config is not None:
        model = get_peft_model(model, peft_config)
    model.train()
    fixed = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    kept = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in fixed:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    backbone = model.get_base_model() if peft_config is not None else model
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()
    ids = torch.randint(0, config.vocab_size, (batch, length), device=device)
    mask = torch.ones_like(ids)
    mask[-1, -PADDING:] = 0
    with autocast, torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        getattr(backbone, backbone.base_model_prefix)(input_ids=ids, attention_mask=mask, use_cache=False)
    return sum(kept.values())


# --- report ---------------------------------------------------------------------------------------------------------


def print_table(rows: list[dict], args) -> None:
    what = "peak RSS rise (VmHWM)" if args.device == "cpu" else "torch.cuda.max_memory_allocated rise"
    print(
        f"\n| case | tokens | peak: estimate (MiB) | peak: measured {what} (MiB) | error | end of forward: estimate / "
        "measured (MiB) | error | planner's peak at |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(
            f"| {r['case']} | {r['tokens']} | {r['estimate']['total'] / 2**20:,.0f} | {r['peak'] / 2**20:,.0f} | "
            f"{r['error']:+.1%} | {r['estimate']['after_forward'] / 2**20:,.0f} / {r['after_forward'] / 2**20:,.0f} | "
            f"{r['forward_error']:+.1%} | {r['estimate']['peak_at']} |"
        )
    errors = [abs(r["error"]) for r in rows]
    within = sum(e <= TARGET_ERROR for e in errors)
    print(
        f"\n{within} of {len(rows)} within ±{TARGET_ERROR:.0%}; mean |error| {sum(errors) / len(errors):.1%}, "
        f"max {max(errors):.1%}"
    )


def _loadable(attention: str, family: str) -> str:
    """transformers' name for the configured attention: GPT-Neo's `sdpa` is ours (finetune.neo_attention), loaded
    eager then enabled; NeoX's and GPT-J's are transformers' own."""
    return "eager" if family == "gpt_neo" and attention == "sdpa" else attention


if __name__ == "__main__":
    main()
