"""QLoRA for real on CPU (bitsandbytes >= 0.50 has CPU NF4 kernels): a 4-bit NF4 base with double quantization trains
LoRA through the CLI, the adapter records its quantization, and the merge goes into the unquantized weights with a
gate that compares the merged model with the 4-bit model that trained, in next-token probabilities."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from finetune import console as cli
from finetune.adapters import merge
from finetune.errors import IntegrityError
from finetune.runs import checkpoints

from helpers import tiny_overrides

QUANTIZATION = {
    "load_in_4bit": True,
    "bnb_4bit_quant_type": "nf4",
    "bnb_4bit_use_double_quant": True,
    "bnb_4bit_compute_dtype": "bfloat16",
}


@pytest.fixture(scope="module")
def qlora_run(tiny_models, tmp_path_factory):
    from finetune.config.compose import compose
    from finetune.train.run import run

    out = tmp_path_factory.mktemp("qlora") / "run"
    cfg = compose(
        "demo",
        tiny_overrides(
            "neox",
            tiny_models["neox"],
            out,
            "strategy=qlora",
            "trainer.max_steps=4",
            "eval_before_training=false",
            "sample_generations=0",
        ),
    )
    assert run(cfg) == out
    return out


def test_qlora_trains_on_a_4bit_nf4_base_on_cpu(qlora_run):
    record = json.loads((qlora_run / "run.json").read_text())
    assert record["status"] == "completed" and record["global_steps"] == 4
    assert record["trainable_parameters"] > 0 and all(
        torch.isfinite(torch.tensor(h["loss"]))
        for h in json.loads((qlora_run / "metrics.json").read_text())["history"]
        if "loss" in h
    )
    base = json.loads((qlora_run / "adapter" / "base_model.json").read_text())
    assert base["quantization"] == QUANTIZATION
    weights = load_file(qlora_run / "adapter" / "adapter_model.safetensors")
    assert weights and all("lora_" in name for name in weights)  # only the adapter, never the 4-bit base


def test_qlora_merge_goes_into_the_real_weights_and_is_compared_with_the_4bit_model(qlora_run, tmp_path):
    out = merge.run(
        cli.parse([str(qlora_run), f"out={tmp_path / 'merged'}", "dtype=float32", "gate=full"], merge.OPTIONS, "target")
    )
    report = json.loads((out / "merge_report.json").read_text())
    gate = report["gate"]
    # arithmetic: vs base + adapter
    assert report["valid"] and gate["merge_passed"] and gate["max_abs_diff"] <= gate["tolerance"]
    trained = gate["trained_model"]
    assert trained["measured"] and trained["passed"] and trained["quantization"] == QUANTIZATION
    assert 0 < trained["max_abs_diff"] <= trained["tolerance"] == pytest.approx(2 * trained["reference_gap"])
    merged = load_file(next(out.glob("*.safetensors")))
    # unquantized weights, no 4-bit tensors or quant state
    assert all(t.dtype == torch.float32 for t in merged.values())
    assert not any("absmax" in name or "quant" in name for name in merged)


def test_qlora_merge_far_from_the_trained_model_is_refused(qlora_run, tmp_path):
    """A merged model whose probabilities moved (one attention weight scaled) fails both checks and is set aside."""
    good = merge.run(
        cli.parse([str(qlora_run), f"out={tmp_path / 'merged'}", "dtype=float32", "gate=full"], merge.OPTIONS, "target")
    )
    shard = next(good.glob("*.safetensors"))
    tensors = load_file(shard)
    name = next(n for n in tensors if "query_key_value.weight" in n)
    tensors[name] = tensors[name] * 1.5
    save_file(tensors, shard, metadata={"format": "pt"})
    # a merge that wrote wrong weights consistently: the gate, not the manifest, must catch it
    checkpoints.seal(good, "merged")
    with pytest.raises(IntegrityError, match="do not compute what base \\+ adapter computed"):
        merge.run(
            cli.parse(
                [str(qlora_run), f"out={good}", "dtype=float32", "gate=full", "verify=true"], merge.OPTIONS, "target"
            )
        )
    report = json.loads((good.with_name("merged.invalid") / "merge_report.json").read_text())
    assert not report["verified"]["trained_model"]["passed"]
    shutil.rmtree(good.with_name("merged.invalid"))
