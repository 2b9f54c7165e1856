"""The streaming merge: equal to peft's merge_and_unload, gated numerically, and refusing unsafe or mismatched input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from finetune import console as cli
from finetune.adapters import merge
from finetune.errors import ConfigError, IntegrityError
from finetune.models import fingerprint
from finetune.runs import checkpoints, rundir

TARGETS = {
    "neo": ["q_proj", "k_proj", "v_proj", "out_proj", "c_fc", "c_proj"],
    "neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "gptj": ["q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"],
}


def random_adapter(base: Path, out: Path, arch: str, dora: bool = False, seed: int = 0, **lora) -> Path:
    """A LoRA/DoRA adapter with random (non-zero) B matrices and magnitudes, saved by peft, with its base recorded."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[arch], use_dora=dora, task_type="CAUSAL_LM", **lora)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
            elif "lora_magnitude_vector" in name:
                param.mul_(1 + 0.1 * torch.randn_like(param))
    peft_model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    record = {
        "hub_id": None,
        "name_or_path": base.name,
        "revision": "main",
        "family": arch,
        "training_dtype": "float32",
        "config_sha256": fingerprint.config_sha256(base),
        "weights_fingerprint": fingerprint.base_model(base),
    }
    (out / rundir.BASE_RECORD).write_text(json.dumps(record))
    return out


def run_merge(adapter: Path, base: Path, out: Path, *extra: str) -> Path:
    return merge.run(cli.parse([str(adapter), f"base={base}", f"out={out}", *extra], merge.OPTIONS, "target"))


def peft_merged(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
    return model.merge_and_unload().state_dict()


def loaded_state(folder: Path) -> dict[str, torch.Tensor]:
    """The merged folder as transformers loads it (checkpoint names mapped to module names, e.g. NeoX embed_out)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()


def assert_equal_to_peft(folder: Path, expected: dict[str, torch.Tensor]) -> None:
    got = loaded_state(folder)
    assert set(got) == set(expected)
    for name, tensor in got.items():
        assert torch.allclose(tensor, expected[name], atol=1e-6, rtol=0), name


def merged_state(folder: Path) -> dict[str, torch.Tensor]:
    state = {}
    for path in sorted(folder.glob("*.safetensors")):
        state.update(load_file(path))
    return state


@pytest.fixture(scope="module")
def sharded_neox(tiny_models, tmp_path_factory) -> Path:
    """The tiny NeoX re-saved in several shards with an index (how real checkpoints come)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("sharded") / "neox"
    AutoModelForCausalLM.from_pretrained(tiny_models["neox"]).save_pretrained(out, max_shard_size="1MB")
    AutoTokenizer.from_pretrained(tiny_models["neox"]).save_pretrained(out)
    assert len(list(out.glob("model-*.safetensors"))) > 1
    return out


@pytest.mark.parametrize(
    ("arch", "dora"), [("neo", False), ("neo", True), ("neox", False), ("neox", True), ("gptj", False)]
)
def test_streaming_merge_equals_peft_merge(arch, dora, tiny_models, tmp_path):
    base = tiny_models[arch]
    adapter = random_adapter(base, tmp_path / "adapter", arch, dora=dora)
    out = run_merge(adapter, base, tmp_path / "merged", "dtype=float32")

    assert_equal_to_peft(out, peft_merged(base, adapter))
    got, original = merged_state(out), load_file(base / "model.safetensors")
    assert set(got) == set(original)  # the base checkpoint's tensors under its own names, no more
    changed = sum(not torch.equal(tensor, original[name]) for name, tensor in got.items())
    report = json.loads((out / "merge_report.json").read_text())
    assert changed == report["merged_modules"] == 4 * len(TARGETS[arch])  # 4 blocks x every target
    assert report["valid"] and report["gate"]["mode"] == "full" and report["gate"]["max_abs_diff"] <= 1e-4


def test_sharded_base_merges_shard_by_shard_with_rslora_and_rank_pattern(sharded_neox, tmp_path):
    adapter = random_adapter(
        sharded_neox,
        tmp_path / "adapter",
        "neox",
        use_rslora=True,
        rank_pattern={"dense_h_to_4h": 2},
        alpha_pattern={"dense": 3},
    )
    out = run_merge(adapter, sharded_neox, tmp_path / "merged", "dtype=float32")

    index = json.loads((out / "model.safetensors.index.json").read_text())
    base_index = json.loads((sharded_neox / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == base_index["weight_map"]  # the base's layout, shard for shard
    assert_equal_to_peft(out, peft_merged(sharded_neox, adapter))


@pytest.fixture(scope="module")
def bf16_neox(tiny_models, tmp_path_factory) -> Path:
    """The tiny NeoX stored in bf16, as published checkpoints are (its weights round-trip bf16 exactly)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("bf16") / "neox"
    AutoModelForCausalLM.from_pretrained(tiny_models["neox"], dtype=torch.bfloat16).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_models["neox"]).save_pretrained(out)
    return out


@pytest.mark.parametrize(
    ("mode", "stored"), [("full", "fp32"), ("layers", "fp32"), ("full", "bf16"), ("layers", "bf16")]
)
def test_bf16_merge_passes_gate_relative_to_base_gap(mode, stored, tiny_models, bf16_neox, tmp_path):
    base = bf16_neox if stored == "bf16" else tiny_models["neox"]
    adapter = random_adapter(base, tmp_path / "adapter", "neox")
    out = run_merge(adapter, base, tmp_path / "merged", "dtype=bfloat16", f"gate={mode}")
    report = json.loads((out / "merge_report.json").read_text())
    assert all(t.dtype == torch.bfloat16 for t in merged_state(out).values())
    gate = report["gate"]
    assert gate["reference_gap"] > 0 and gate["tolerance"] == pytest.approx(2 * gate["reference_gap"])
    assert gate["passed"]


@pytest.mark.parametrize("mode", ["full", "layers"])
def test_gate_fails_on_tampered_adapter_and_marks_merge_invalid(mode, tiny_models, tmp_path):
    base = tiny_models["neox"]
    adapter = random_adapter(base, tmp_path / "adapter", "neox")
    out = run_merge(adapter, base, tmp_path / "merged", "dtype=float32", f"gate={mode}")
    assert json.loads((out / "merge_report.json").read_text())["gate"]["mode"] == mode

    path = adapter / "adapter_model.safetensors"  # tamper: one B matrix scaled after the merge
    tensors = load_file(path)
    key = next(k for k in tensors if "layers.0" in k and "lora_B" in k)
    tensors[key] = tensors[key] * 1.5
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(IntegrityError, match="do not compute what base"):
        run_merge(adapter, base, out, "verify=true", f"gate={mode}")
    invalid = tmp_path / "merged.invalid"
    assert not out.exists() and json.loads((invalid / "merge_report.json").read_text())["valid"] is False


def test_gate_fails_on_tampered_merged_shard(tiny_models, tmp_path):
    base = tiny_models["neo"]
    adapter = random_adapter(base, tmp_path / "adapter", "neo")
    out = run_merge(adapter, base, tmp_path / "merged", "dtype=float32")
    tensors = load_file(out / "model.safetensors")
    key = "transformer.h.2.mlp.c_fc.weight"
    # (a constant shift is invisible after LayerNorm)
    tensors[key] = tensors[key] + 1e-2 * torch.randn_like(tensors[key])
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    checkpoints.seal(out, "merged")  # wrong weights written consistently: the gate, not the manifest, must catch it
    with pytest.raises(IntegrityError, match="do not compute what base \\+ adapter computed"):
        run_merge(adapter, base, out, "verify=true")


def test_base_mismatch_refused_naming_both(tiny_models, tmp_path):
    base = tiny_models["neox"]
    adapter = random_adapter(base, tmp_path / "adapter", "neox")
    other = tmp_path / "other-neox"  # same shapes, different weights (a fine-tune of the base, say)
    shutil.copytree(base, other)
    tensors = load_file(other / "model.safetensors")
    save_file({k: v + 0.01 for k, v in tensors.items()}, other / "model.safetensors", metadata={"format": "pt"})

    with pytest.raises(IntegrityError) as err:
        run_merge(adapter, other, tmp_path / "merged")
    message = str(err.value)
    assert f"trained on {base.name}@main" in message and str(other) in message and "weights fingerprint" in message
    assert not (tmp_path / "merged").exists() and not (tmp_path / "merged.partial").exists()


def test_pickled_weights_refused_unless_allowed_then_weights_only(tiny_models, tmp_path):
    base = tmp_path / "pickled-base"
    shutil.copytree(tiny_models["neo"], base)
    state = load_file(base / "model.safetensors")
    (base / "model.safetensors").unlink()
    torch.save(state, base / "pytorch_model.bin")
    adapter = random_adapter(tiny_models["neo"], tmp_path / "adapter", "neo")
    (adapter / rundir.BASE_RECORD).unlink()  # the pickled copy has no safetensors to fingerprint

    with pytest.raises(IntegrityError, match="allow_pickle=true"):
        run_merge(adapter, base, tmp_path / "merged")
    out = run_merge(adapter, base, tmp_path / "merged", "allow_pickle=true", "dtype=float32")
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    assert_equal_to_peft(out, peft_merged(tiny_models["neo"], adapter))

    pickled_adapter = tmp_path / "pickled-adapter"
    shutil.copytree(adapter, pickled_adapter)
    torch.save(load_file(pickled_adapter / "adapter_model.safetensors"), pickled_adapter / "adapter_model.bin")
    (pickled_adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(IntegrityError, match="adapter_model.bin is pickled"):
        run_merge(pickled_adapter, tiny_models["neo"], tmp_path / "merged2")


def test_pickle_with_code_refused_even_when_allowed(tiny_models, tmp_path):
    base = tmp_path / "evil-base"
    shutil.copytree(tiny_models["neo"], base)
    (base / "model.safetensors").unlink()
    torch.save({"weight": torch.zeros(2), "payload": Path("/tmp")}, base / "pytorch_model.bin")  # not plain tensors
    adapter = random_adapter(tiny_models["neo"], tmp_path / "adapter", "neo")
    (adapter / rundir.BASE_RECORD).unlink()
    with pytest.raises(IntegrityError, match="weights_only"):
        run_merge(adapter, base, tmp_path / "merged", "allow_pickle=true")


def test_shard_index_pointing_outside_the_folder_refused(sharded_neox, tmp_path):
    base = tmp_path / "traversal"
    shutil.copytree(sharded_neox, base)
    index = json.loads((base / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copy(base / index["weight_map"][first], outside)
    index["weight_map"][first] = "../elsewhere.safetensors"
    (base / "model.safetensors.index.json").write_text(json.dumps(index))
    adapter = random_adapter(sharded_neox, tmp_path / "adapter", "neox")
    (adapter / rundir.BASE_RECORD).unlink()
    with pytest.raises(IntegrityError, match="outside the model folder"):
        run_merge(adapter, base, tmp_path / "merged")


def test_corrupt_safetensors_header_refused(tiny_models, tmp_path):
    base = tmp_path / "corrupt"
    shutil.copytree(tiny_models["neo"], base)
    with (base / "model.safetensors").open("r+b") as f:
        f.write((10**12).to_bytes(8, "little"))  # a header length far past the file
    adapter = random_adapter(tiny_models["neo"], tmp_path / "adapter", "neo")
    (adapter / rundir.BASE_RECORD).unlink()
    with pytest.raises(IntegrityError, match="not a valid safetensors file"):
        run_merge(adapter, base, tmp_path / "merged")


def test_unsupported_adapter_and_bad_arguments_refused(tiny_models, tmp_path):
    adapter = random_adapter(tiny_models["neo"], tmp_path / "adapter", "neo")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "modules_to_save": ["lm_head"]}))
    with pytest.raises(IntegrityError, match="modules_to_save"):
        run_merge(adapter, tiny_models["neo"], tmp_path / "merged")
    with pytest.raises(ConfigError, match="did you mean 'dtype'"):
        cli.parse([str(adapter), "dtpye=float32"], merge.OPTIONS, "target")
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    (tmp_path / "merged").mkdir()
    with pytest.raises(ConfigError, match="overwrite=true"):
        run_merge(adapter, tiny_models["neo"], tmp_path / "merged")
