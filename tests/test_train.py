"""LoRA / DoRA / full SFT through the production path on tiny checkpoints loaded with from_pretrained."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from finetune.config import precision
from finetune.config.compose import compose
from finetune.train.run import run

from helpers import run_cli, tiny_overrides


def train(arch, tiny_models, tmp_path, *extra) -> Path:
    return run(compose("demo", tiny_overrides(arch, tiny_models[arch], tmp_path / "run", *extra)))


def base_state(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


def assert_describes_itself(run_dir: Path, weights: str) -> None:
    assert json.loads((run_dir / "run.json").read_text())["status"] == "completed"
    assert (run_dir / "config.yaml").exists() and (run_dir / "data_template.yaml").exists()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert any("loss" in h for h in metrics["history"]) and "eval_loss" in metrics["eval_after"]
    assert (run_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "### Response:" in (run_dir / weights / "chat_template.jinja").read_text()
    pickles = [p for p in run_dir.rglob("*") if p.suffix in (".bin", ".pt", ".pkl", ".pth")]
    assert pickles == []  # no pickled training args (or anything else) in the run directory


@pytest.mark.parametrize("arch", ["neo", "neox", "gptj"])
def test_lora_trains_adapter_only_and_merges_exactly(arch, tiny_models, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    before = base_state(tiny_models[arch])
    run_dir = train(arch, tiny_models, tmp_path)
    adapter_dir = run_dir / "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {
        p.name for p in adapter_dir.iterdir()
    }
    assert_describes_itself(run_dir, "adapter")

    # the base checkpoint on disk is bitwise unchanged
    after = base_state(tiny_models[arch])
    assert all(torch.equal(before[k], after[k]) for k in before)

    # every LoRA B matrix left its zero initialisation; targets are the family's, never the output embedding
    adapter = load_file(str(adapter_dir / "adapter_model.safetensors"))
    b_weights = {k: v for k, v in adapter.items() if "lora_B" in k}
    assert b_weights and all(v.abs().sum() > 0 for v in b_weights.values())
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is False
    assert not any(name in k for k in adapter for name in ("lm_head", "embed_out", "wte"))

    # plain peft reloads it, and merging gives the same logits as base + adapter
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_models[arch], dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    ids = tokenizer("A tenant asked whether the deposit", return_tensors="pt").input_ids
    with torch.no_grad():
        adapted = model(ids).logits
        base_only = model.get_base_model()
        with model.disable_adapter():
            plain = base_only(ids).logits
        merged = model.merge_and_unload()(ids).logits
    assert not torch.allclose(adapted, plain)  # the adapter changes the model
    torch.testing.assert_close(merged, adapted, atol=1e-4, rtol=1e-4)


def test_lora_adapter_a_matrices_moved_from_their_seeded_init(tiny_models, tmp_path):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, set_seed

    from finetune.models.strategy import peft_config

    run_dir = train("neo", tiny_models, tmp_path)
    trained = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    set_seed(42)
    base = AutoModelForCausalLM.from_pretrained(tiny_models["neo"])
    cfg = compose("demo", ["model.tiny=null", f"model.name_or_path={tiny_models['neo']}"])
    from omegaconf import OmegaConf

    initial = get_peft_model(base, peft_config(OmegaConf.to_container(cfg.strategy, resolve=True))).state_dict()
    for key, value in trained.items():
        init_key = next(
            k
            for k in initial
            if k.endswith(key.removeprefix("base_model.model.").replace(".weight", ".default.weight"))
        )
        assert not torch.equal(initial[init_key], value), key


def test_dora_trains_magnitudes(tiny_models, tmp_path):
    run_dir = train("neox", tiny_models, tmp_path, "strategy=dora")
    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    adapter = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    assert any("lora_magnitude_vector" in k for k in adapter)


@pytest.mark.parametrize("arch", ["neo", "neox"])
def test_full_sft_moves_every_weight_and_saves_safetensors(arch, tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM

    before = base_state(tiny_models[arch])
    run_dir = train(arch, tiny_models, tmp_path, "strategy=full", "trainer.learning_rate=1e-3")
    assert_describes_itself(run_dir, "model")
    saved = load_file(str(run_dir / "model" / "model.safetensors"))
    moved = [k for k in before if k in saved and not torch.equal(before[k], saved[k])]
    assert len(moved) == len([k for k in before if k in saved])  # every weight trained
    AutoModelForCausalLM.from_pretrained(run_dir / "model")  # loads as a plain checkpoint


def test_neox20b_preset_runs_against_a_local_checkpoint(tiny_models, tmp_path):
    """`conf=lora_neox20b model.name_or_path=<local dir>`: the preset's own settings (bf16 autocast, checkpointing)."""
    out = run_cli(
        "conf=lora_neox20b",
        f"model.name_or_path={tiny_models['neox']}",
        f"output_dir={tmp_path / 'run'}",
        "trainer.max_steps=2",
        "trainer.per_device_train_batch_size=2",
        "trainer.gradient_accumulation_steps=1",
        "sample_generations=0",
        "eval_before_training=false",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["status"] == "completed" and record["preset"] == "lora_neox20b" and record["global_steps"] == 2
    bf16, why = precision.choose()  # dtype auto, bf16 auto: this machine's choice, resolved in config.yaml and run.json
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["model"]["dtype"] == ("bfloat16" if bf16 else "float32") and saved["trainer"]["bf16"] is bf16
    assert why in record["precision"] and f"precision: {record['precision']}" in out.stderr
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").exists()


def test_packed_multi_turn_run_with_skipped_rows(tiny_models, tmp_path):
    """chatml rows, one broken row skipped, packing on tiny GPT-NeoX: accounting, rejects and template saved."""
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Question {i} about a lease?"},
                {"role": "assistant", "content": f"Answer {i}." + " More." * (i % 9)},
                {"role": "user", "content": "And then?"},
                {"role": "assistant", "content": "Then it ends."},
            ]
        }
        for i in range(60)
    ]
    rows[5] = {"messages": [{"role": "assistant", "content": "I speak first."}]}
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_dir = train(
        "neox",
        tiny_models,
        tmp_path,
        "data=chatml",
        f"data.path={path}",
        "data.packing=true",
        "data.max_length=256",
        "data.skip_invalid=true",
        "data.max_dropped_fraction=0.05",
        "data.eval_fraction=0.1",
    )
    record = json.loads((run_dir / "run.json").read_text())
    accounting = record["data"]
    assert record["status"] == "completed"
    assert accounting["rows_read"] == 60 and accounting["rows_rejected"] == {"bad_conversation": 1}
    assert accounting["train_rows"] + accounting["eval_rows"] == 59
    assert accounting["packing"]["rows"] < accounting["train_samples"] and accounting["packing"]["efficiency"] > 0.8
    rejected = [json.loads(line) for line in (run_dir / "rejected_rows.jsonl").read_text().splitlines()]
    assert rejected == [
        {
            "where": f"{path}:6",
            "reason": "bad_conversation",
            "detail": "messages[0]: expected a user message (user and assistant alternate, user first), got assistant",
            "raw": json.dumps(rows[5]),
        }
    ]
    assert "<|im_start|>" in (run_dir / "adapter" / "chat_template.jinja").read_text()


def test_preview_shows_trained_tokens_without_loading_the_model(tiny_models, tmp_path):
    import subprocess
    import sys

    overrides = tiny_overrides("neo", tiny_models["neo"], tmp_path / "run")
    code = (
        "import sys; from finetune.preview import main; main(sys.argv[1:]); "
        "assert 'transformers.models.gpt_neo.modeling_gpt_neo' not in sys.modules, 'the model code was loaded'"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, "n=2", "--no-color", *overrides], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.count("--- ") == 2 and "[[" in out and "<|endoftext|>]]" in out
    assert "rows read = 288 train + 32 held out + 0 not kept" in out
    assert "no packing (data.packing=auto" in out and "padded batches of 4 samples are" in out and "packed rows" in out
    assert not (tmp_path / "run").exists()  # a preview writes nothing

    bad = subprocess.run(
        [sys.executable, "-m", "finetune.preview", *overrides, "data.path=/nonexistent.jsonl"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and "data.path: '/nonexistent.jsonl': no such file" in bad.stderr


def test_gradient_checkpointing_reaches_transformers_under_its_current_name(tmp_path):
    """trainer.gradient_checkpointing (our presets' key) is handed over as activation_checkpointing: on, and without
    the FutureWarning transformers 5.2x gives for the old name (removed in v6)."""
    import warnings

    from omegaconf import OmegaConf
    from trl import SFTConfig

    from finetune.config.validate import validate
    from finetune.train.run import _training_arguments

    resolved, _ = validate(compose("demo", [f"output_dir={tmp_path}", "trainer.gradient_checkpointing=true"]))
    precision.resolve(resolved, False)
    kwargs = _training_arguments(OmegaConf.create(resolved), tmp_path, has_eval=True, cuda=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        args = SFTConfig(**kwargs)
    assert args.activation_checkpointing is True and args.gradient_checkpointing is True
