"""Preference tuning through the real command: DPO, ORPO, SimPO and KTO runs on tiny checkpoints with the bundled
pairs, the two-stage journey (init_from an SFT run), and every objective config problem reported before a model loads.

The losses themselves are checked against the papers' formulas in tests/test_preference_losses.py; here the runs must
finish, raise the held-out reward margin, save the trained adapter alone, and say in the card what trained it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from safetensors.torch import load_file

from finetune.config.compose import compose
from finetune.config.validate import validate
from finetune.errors import ConfigError

from helpers import PROJECT, tiny_overrides


def preference_overrides(arch: str, model_dir: Path, output_dir: Path, objective: str, *extra: str) -> list[str]:
    return tiny_overrides(
        arch,
        model_dir,
        output_dir,
        f"objective={objective}",
        "data=demo_prefs",
        "trainer.eval_strategy=no",
        "trainer.save_strategy=no",
        "sample_generations=1",
        *extra,
    )


def finetune(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "finetune", *args], cwd=PROJECT, capture_output=True, text=True, timeout=900
    )


@pytest.fixture(scope="module")
def dpo_run(tiny_models, tmp_path_factory) -> Path:
    """DPO with a fresh LoRA on tiny GPT-Neo (local window 32 < the pairs' length): the reference is the base with
    the adapter switched off."""
    run_dir = tmp_path_factory.mktemp("dpo") / "run"
    result = finetune(
        preference_overrides(
            "neo", tiny_models["neo"], run_dir, "dpo", "trainer.max_steps=12", "trainer.logging_steps=4"
        )
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return run_dir


def test_dpo_run_raises_the_held_out_margin_and_records_it(dpo_run):
    record = json.loads((dpo_run / "run.json").read_text())
    assert record["status"] == "completed"
    metrics = record["preference_eval"]["metrics"]
    margin, accuracy = metrics["reward margin"], metrics["preference accuracy"]
    assert margin["before"] == pytest.approx(0.0, abs=1e-6)  # step 0: the policy is the reference
    assert margin["after"] > 0.05, margin
    assert accuracy["after"] > 0.5, accuracy
    assert record["data"]["kind"] == "paired" and record["data"]["pairs"] > 0
    log = (dpo_run / "train.log").read_text()
    assert "margin" in log and "accuracy" in log  # the per-step line carries the reward columns
    assert "held-out reward margin" in log
    steps = [json.loads(line) for line in (dpo_run / "train_steps.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == list(range(1, 13)) and all(s["batches"] for s in steps)


def test_dpo_saves_the_trained_adapter_alone_with_a_card_naming_the_objective(dpo_run):
    adapter = dpo_run / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file() and not (adapter / "ref").exists()
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in weights.items())  # trained away from B = 0
    card = (adapter / "README.md").read_text()
    assert "DPO (beta=0.1" in card and "- dpo" in card
    assert "held-out pairs" in card and "preference accuracy" in card


def test_init_from_continues_an_sft_adapter_which_is_also_the_reference(tiny_run, tiny_models, tmp_path):
    run_dir = tmp_path / "dpo"
    result = finetune(
        preference_overrides(
            "neox",
            tiny_models["neox"],
            run_dir,
            "dpo",
            f"objective.init_from={tiny_run}",
            "trainer.max_steps=4",
            "trainer.save_strategy=steps",
            "trainer.save_steps=2",
        )
    )
    assert result.returncode == 0, result.stderr[-4000:]
    record = json.loads((run_dir / "run.json").read_text())
    # the reference is the SFT adapter, which is also where the policy starts: no margin before training
    assert record["preference_eval"]["metrics"]["reward margin"]["before"] == pytest.approx(0.0, abs=1e-6)
    for folder in (run_dir / "adapter", run_dir / "checkpoints" / "checkpoint-4"):
        assert not (folder / "ref").exists(), f"trl's reference adapter was saved in {folder}"
    sft = load_file(str(tiny_run / "adapter" / "adapter_model.safetensors"))
    dpo = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    assert sft.keys() == dpo.keys()
    moved = max((dpo[k] - sft[k]).abs().max().item() for k in sft)
    assert 0 < moved < max(v.abs().max().item() for v in sft.values())  # continued from SFT, not started afresh
    assert f"| started from the adapter of run | {tiny_run.name} |" in (run_dir / "adapter" / "README.md").read_text()


@pytest.mark.parametrize("objective", ["orpo", "simpo", "kto"])
def test_every_objective_trains_on_neox_and_gptj(objective, tiny_models, tmp_path):
    arch = "gptj" if objective == "simpo" else "neox"
    run_dir = tmp_path / objective
    result = finetune(
        preference_overrides(
            arch, tiny_models[arch], run_dir, objective, "trainer.max_steps=3", "trainer.logging_steps=1"
        )
    )
    assert result.returncode == 0, result.stderr[-4000:]
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "completed" and record["global_steps"] == 3
    assert record["data"]["kind"] == ("unpaired" if objective == "kto" else "paired")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert "eval_loss" in json.dumps(metrics)
    assert objective.upper() in (run_dir / "adapter" / "README.md").read_text()


def problems(preset: str, *overrides: str) -> list[str]:
    cfg = compose(preset, ["output_dir=/tmp/never-written-preference", *overrides])
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    return err.value.problems


def test_objective_problems_are_reported_together_before_any_model_loads():
    found = problems(
        "dpo_demo",
        "+objective.bta=0.2",
        "+trainer.beta=0.3",
        "+objective.max_length=64",
        "data.packing=true",
        "+trainer.dataset_text_field=text",
    )
    text = "\n".join(found)
    assert "unknown key 'objective.bta' for objective=dpo" in text and "beta" in text
    assert "trainer.beta: a key of objective=dpo; set objective.beta instead" in text
    assert "objective.max_length: set through data.max_length" in text
    assert "data.packing: objective=dpo trains on padded pairs" in text
    assert "trainer.dataset_text_field: an SFT option" in text


def test_objective_specific_problems():
    assert any(
        "set it to 2 or more" in p
        for p in problems("dpo_demo", "objective=kto", "trainer.per_device_train_batch_size=1")
    )
    assert any("objective=sft has only name and init_from" in p for p in problems("demo", "+objective.beta=0.1"))
    assert any(
        "remove objective.loss_type" in p
        for p in problems("dpo_demo", "objective=simpo", "+objective.loss_type=sigmoid")
    )
    assert any("is not one of sft, dpo" in p for p in problems("demo", "objective.name=ppo"))


def test_init_from_must_be_a_finished_run_with_the_same_base_and_template(tiny_run, tmp_path):
    found = problems("dpo_demo", f"objective.init_from={tmp_path / 'nothing'}")
    assert any("objective.init_from:" in p and "no such directory" in p for p in found)
    found = problems("dpo_demo", f"objective.init_from={tiny_run}", f"output_dir={tiny_run}", "overwrite=true")
    assert any("is this run's own output_dir" in p for p in found)
    found = problems("dpo_demo", f"objective.init_from={tiny_run}", "data.template=chatml")
    text = "\n".join(found)
    assert "model.name_or_path" in text  # tiny_run trained tiny NeoX; dpo_demo is tiny GPT-Neo
    assert "data.template=alpaca" in text


def test_sft_config_keeps_validating_and_hashing_as_before():
    resolved, _ = validate(compose("demo", ["output_dir=/tmp/never-written-preference"]))
    assert resolved["objective"] == {"name": "sft", "init_from": None}
    cfg = OmegaConf.create(resolved)
    from finetune.models.fingerprint import run_facts

    assert run_facts(cfg, resolved["strategy"], "b", "d", 1)["objective"] is None  # old checkpoints still resume


def test_a_dpo_adapter_merges_through_the_gate_and_generates(dpo_run, tmp_path):
    """The DPO adapter is a standard one: merged with the numerical gate (finetune merge), then generated from."""
    import shutil

    run_dir = Path(shutil.copytree(dpo_run, tmp_path / "run"))
    merged = subprocess.run(
        [sys.executable, "-m", "finetune", "merge", str(run_dir)],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert merged.returncode == 0, merged.stderr[-3000:]
    report = json.loads((run_dir / "merged" / "merge_report.json").read_text())
    assert report["valid"] and report["gate"]["max_abs_diff"] <= report["gate"]["tolerance"]
    generated = subprocess.run(
        [sys.executable, "-m", "finetune", "generate", str(run_dir), "prompt=What is a lease?", "max_new_tokens=4"],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert generated.returncode == 0, generated.stderr[-3000:]
    assert generated.stdout.strip()


def test_preview_shows_chosen_and_rejected_side_by_side_without_loading_the_model(tiny_models):
    from finetune.data.preview import preview

    text = preview("dpo_demo", [f"model.name_or_path={tiny_models['neo']}", "model.tiny=null"], n=2)
    assert text.startswith("objective dpo, template alpaca")
    pair = text.split("--- ", 2)[1]
    assert "legal_medical_prefs.jsonl:1: prompt" in pair and "### Response:" in pair
    header = next(line for line in pair.splitlines() if line.startswith("chosen ("))
    assert " | rejected (" in header  # the two answers in two columns
    assert pair.count("<|endoftext|>]]") == 2  # each answer trained up to and including its EOS
    assert "data: 288 train pairs" in text
    kto = preview("dpo_demo", [f"model.name_or_path={tiny_models['neo']}", "model.tiny=null", "objective=kto"], n=4)
    assert "desirable completion" in kto and "undesirable completion" in kto  # shuffled: both kinds come early


def test_init_from_an_adapter_changed_after_training_is_refused_before_it_trains(tiny_run, tiny_models, tmp_path):
    import shutil

    sft = Path(shutil.copytree(tiny_run, tmp_path / "sft"))
    weights = sft / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)  # same size, other bytes
    result = finetune(
        preference_overrides("neox", tiny_models["neox"], tmp_path / "dpo", "dpo", f"objective.init_from={sft}")
    )
    assert result.returncode == 3, result.stderr[-3000:]
    assert "objective.init_from:" in result.stderr and "adapter_model.safetensors" in result.stderr
    assert not (tmp_path / "dpo" / "adapter").exists()
