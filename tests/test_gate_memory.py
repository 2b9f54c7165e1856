"""The merge's peak memory stays at the streaming bound whatever the gate mode (issue 19, item 4).

A NeoX body big enough that holding it shows (12 x 768: 330 MB of fp32 weights in 10 shards of <= 40 MB), a random
LoRA adapter, and two merges in fresh processes: gate=layers (a sample of layers, read tensor by tensor: the
streaming bound) and gate=full (the whole model's logits, base + adapter vs merged). The full gate used to load the
fp32 base, then the merged model: 808 MiB peak against 494 MiB for layers. Streamed, it must stay within a quarter
of one model copy of the layers gate.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from test_merge import random_adapter

from helpers import PROJECT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from finetune.models import tiny

    root = tmp_path_factory.mktemp("sharded")
    source = tiny.build("neox", root / "source", hidden_size=768, layers=12, heads=8)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    model.save_pretrained(root / "base", max_shard_size="40MB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (root / "base" / name).write_bytes((source / name).read_bytes())
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    del model
    assert len(list((root / "base").glob("*.safetensors"))) >= 8
    return root / "base", random_adapter(root / "base", root / "adapter", "neox"), model_bytes


def merge_report(base, adapter, out, gate: str) -> dict:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "finetune.merge",
            str(adapter),
            f"base={base}",
            f"out={out}",
            f"gate={gate}",
            "dtype=float32",
        ],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "merge_report.json").read_text())


def test_full_gate_peak_stays_at_the_streaming_bound(sharded, tmp_path):
    base, adapter, model_bytes = sharded
    layers = merge_report(base, adapter, tmp_path / "layers", "layers")
    full = merge_report(base, adapter, tmp_path / "full", "full")
    assert full["gate"]["mode"] == "full" and full["gate"]["passed"] and full["gate"]["max_abs_diff"] <= 1e-4
    assert layers["gate"]["mode"] == "layers" and layers["gate"]["passed"]
    assert full["peak_rss_bytes"] <= layers["peak_rss_bytes"] + model_bytes / 4, (
        f"full gate peak {full['peak_rss_bytes'] / 2**20:.0f} MiB vs layers {layers['peak_rss_bytes'] / 2**20:.0f} MiB "
        f"for a {model_bytes / 2**20:.0f} MiB model"
    )
