"""Time: FLOPs per training token, tokens/s at `mfu` x the GPU's dense peak, and the length of the whole run (its
optimizer steps from trainer.max_steps or from the rows of local data files, every row padded to max_length: an
upper bound)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from finetune.plan.architecture import Adapter, Architecture
from finetune.plan.hardware import Gpu
from finetune.plan.setup import Setup, trainer_setting

DEFAULT_TRAIN_TOKENS = 100_000_000  # "per 100M tokens" when the config does not fix the run's length


def flops_per_token(arch: Architecture, adapter_: Adapter | None, setup: Setup) -> tuple[float, str]:
    """Executed FLOPs per training token, and the terms that make them up."""
    n, s, layers, h = arch.matmul_params, setup.max_length, arch.layers, arch.hidden
    attention = 12 * layers * s * h  # QK^T and AV: 4*L*s*h forward, twice that backward (no causal saving assumed)
    head = arch.vocab * h
    terms = []
    if adapter_ is None:
        total = 6 * n + attention
        terms.append(f"6N (N = {n / 1e9:.3g}B weights in matmuls)")
    else:
        total = 4 * n + 6 * adapter_.trainable + attention
        terms.append(
            f"2N forward + 2N backward through frozen weights (N = {n / 1e9:.3g}B) + "
            f"6 x {adapter_.trainable / 1e6:.3g}M adapter"
        )
    terms.append(f"attention 12*L*s*h = {attention / 1e9:.3g} GFLOP")
    if setup.reference_forward:
        total += 2 * n + 4 * layers * s * h
        terms.append("+2N the reference's forward (DPO / KTO)")
    if setup.checkpointing:
        total += 2 * (n - head) + 4 * layers * s * h
        terms.append("+2N recompute (gradient checkpointing)")
    total += 2 * head
    terms.append("+2*V*h (trl's LM head recomputes its logits in backward)")
    return float(total), "; ".join(terms)


def peak_tflops(device: Gpu, setup: Setup) -> float | None:
    if setup.device == "cpu":
        return None
    if setup.autocast == "bfloat16" or (not setup.autocast and setup.weight_bytes == 2):
        return device.bf16_tflops or device.fp16_tflops
    if setup.autocast == "float16":
        return device.fp16_tflops
    return device.fp32_tflops


def run_length(resolved: dict, setup: Setup, num_gpus: int) -> tuple[int | None, int, str]:
    """(optimizer steps or None, tokens, how they were found) for the whole run."""
    trainer, data = resolved["trainer"], resolved["data"]
    rows_per_step = setup.micro_batch * setup.grad_accum * num_gpus
    tokens_per_row = setup.sequences * setup.max_length  # a preference row is two sequences
    max_steps = int(trainer_setting(trainer, "max_steps") or -1)
    if max_steps > 0:
        return max_steps, max_steps * rows_per_step * tokens_per_row, f"trainer.max_steps={max_steps}"
    rows = None if setup.packing else count_rows(data["path"])
    if rows is None:
        why = "packed rows" if setup.packing else "the data is not a local file whose rows can be counted"
        return None, DEFAULT_TRAIN_TOKENS, f"per {DEFAULT_TRAIN_TOKENS // 10**6}M tokens ({why})"
    train_rows = (
        rows if (data.get("eval_path") or data.get("eval_split")) else rows - round(rows * data["eval_fraction"])
    )
    epochs = float(trainer_setting(trainer, "num_train_epochs"))
    micro_batches = math.ceil(train_rows / (setup.micro_batch * num_gpus))
    steps = math.ceil(epochs * max(1, math.ceil(micro_batches / setup.grad_accum)))
    basis = f"{epochs:g} epochs of {train_rows:,} rows, {steps} optimizer steps, every row padded to max_length "
    basis += "(an upper bound"
    basis += "; data.packing=auto can only make fewer rows)" if data.get("packing") == "auto" else ")"
    return steps, steps * rows_per_step * tokens_per_row, basis


def count_rows(path) -> int | None:
    """Rows of local .jsonl/.json/.csv/.tsv/.parquet files or globs of them (None for a Hub dataset, a dataset
    folder or anything unreadable)."""
    import glob

    total = 0
    for entry in path if isinstance(path, list) else [path]:
        expanded = str(Path(entry).expanduser())
        files = sorted(glob.glob(expanded, recursive=True)) if any(c in entry for c in "*?[") else [expanded]
        for name in files or [expanded]:
            rows = _file_rows(Path(name))
            if rows is None:
                return None
            total += rows
    return total


def _file_rows(path: Path) -> int | None:
    if not path.is_file():
        return None
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with path.open("rb") as handle:
            return sum(1 for line in handle if line.strip())
    if suffix in (".csv", ".tsv"):
        with path.open("rb") as handle:
            return max(0, sum(1 for line in handle if line.strip()) - 1)
    if suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        return len(data) if isinstance(data, list) else None
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    return None
