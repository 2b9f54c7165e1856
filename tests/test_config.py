"""Every preset and group option composes; family facts are right in every model config; the CLI stays light."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from finetune.config.compose import CONF_DIR, compose, group_options, presets, to_container

from helpers import PROJECT

EXPECTED_PRESETS = {
    "demo",
    "lora_neo125m",
    "lora_neo1.3b",
    "lora_neo2.7b",
    "lora_gptj6b",
    "lora_pythia1b",
    "lora_neox20b",
    "dora_neox20b",
    "qlora_neox20b",
    "full_neo125m",
    "full_neox20b",
    "dpo_demo",
    "dpo_neox20b",
    "dpo_qlora_neox20b",
    "dpo_neo1.3b",
    "dpo_pythia1b",
}
TARGETS = {
    "gpt_neo": ["q_proj", "k_proj", "v_proj", "out_proj", "c_fc", "c_proj"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "gptj": ["q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"],
}


def test_every_preset_is_found_by_recursive_glob():
    found = {p.stem for p in CONF_DIR.rglob("*.yaml") if p.parent == CONF_DIR and p.stem != "config"}
    assert found == EXPECTED_PRESETS
    assert set(presets()) == EXPECTED_PRESETS
    assert len(presets()) == 16


@pytest.mark.parametrize("name", sorted(EXPECTED_PRESETS))
def test_preset_composes_and_resolves(name):
    cfg = OmegaConf.to_container(compose(name), resolve=True)
    assert cfg["output_dir"] == f"runs/{name}"
    assert cfg["strategy"]["name"] in ("lora", "dora", "qlora", "full")
    if cfg["strategy"]["name"] != "full":
        assert cfg["strategy"]["target_modules"] == TARGETS[cfg["model"]["family"]]
        assert cfg["strategy"]["fan_in_fan_out"] is False


def test_every_group_option_composes():
    count = 0
    for group in ("model", "strategy", "objective", "data", "trainer", "distributed"):
        for option in group_options(group):
            overrides = [f"{group}={option}"] + (["data.path=x.jsonl"] if option == "alpaca" else [])
            compose("demo", overrides)
            count += 1
    # models, strategies, objectives, data (demo, demo_prefs + one per template), trainers, distributed backends
    assert count == 16 + 4 + 5 + 8 + 2 + 6


@pytest.mark.parametrize("option", [o for o in group_options("model")])
def test_model_configs_carry_family_facts(option):
    model = OmegaConf.to_container(compose("demo", [f"model={option}"]).model, resolve=True)
    family = model["family"]
    assert model["lora_target_modules"] == TARGETS[family]
    assert "lm_head" not in model["lora_target_modules"] and "embed_out" not in model["lora_target_modules"]
    assert model["trust_remote_code"] is False
    assert model["pad_token"] == ("<|padding|>" if family == "gpt_neox" else None)
    if not option.startswith("tiny_"):
        assert model["dtype"] == "auto"  # finetune.precision: bf16 where native, else fp32
        assert model["name_or_path"].startswith("EleutherAI/")
    if family == "gpt_neo":
        assert model["attn_implementation"] == "sdpa"  # finetune.neo_attention; FA2 ignores the local window


def test_presets_cover_every_family_model():
    models = {OmegaConf.to_container(compose(p).model, resolve=True)["name_or_path"] for p in presets()}
    assert {
        "EleutherAI/gpt-neo-125m",
        "EleutherAI/gpt-neo-1.3B",
        "EleutherAI/gpt-neo-2.7B",
        "EleutherAI/gpt-j-6b",
        "EleutherAI/pythia-1b",
        "EleutherAI/gpt-neox-20b",
    } <= models


def test_full_neox20b_uses_zero3():
    cfg = compose("full_neox20b")
    assert cfg.strategy.name == "full"
    assert cfg.distributed.deepspeed.zero_optimization.stage == 3


def test_cfg_job_prints_resolved_preset_without_importing_torch():
    code = (
        "import sys; from finetune.__main__ import main\n"
        "try:\n    main(['conf=lora_neox20b', '--cfg', 'job'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'trl') if m in sys.modules]\n"
        "print('HEAVY:', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=PROJECT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "name_or_path: EleutherAI/gpt-neox-20b" in out.stdout
    assert "HEAVY: []" in out.stdout


def test_help_lists_presets_and_exit_codes():
    out = subprocess.run(
        [sys.executable, "-m", "finetune", "--help"], cwd=PROJECT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0
    for name in EXPECTED_PRESETS:
        assert name in out.stdout
    assert "exit codes" in out.stdout


@pytest.mark.parametrize("module", ["finetune", "finetune.preview"])
def test_bad_override_syntax_is_a_config_error(module, tmp_path):
    """`strategy.r=[8` is a config problem (exit 2, the override quoted, the fix), not Hydra's parser traceback."""
    result = subprocess.run(
        [sys.executable, "-m", module, "strategy.r=[8", f"output_dir={tmp_path}/run"],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "'strategy.r=[8'" in result.stderr and "key=[a,b]" in result.stderr


@pytest.mark.parametrize("preset", EXPECTED_PRESETS)
def test_own_data_path_is_held_out_from_itself_not_from_the_demo_rows(preset, tmp_path):
    """Issue 21 item 5: `data.path=mine.jsonl` alone must not keep the demo's bundled held-out file (the run would be
    evaluated on legal/medical rows it was never about); an explicit data.eval_path is kept."""
    mine, theirs = tmp_path / "mine.jsonl", tmp_path / "held.jsonl"
    default = to_container(compose(preset))["data"]
    bundled = ("legal_medical_qa_heldout.jsonl", "legal_medical_prefs_heldout.jsonl")
    assert default["eval_path"] is None or Path(default["eval_path"]).name in bundled
    own = to_container(compose(preset, [f"data.path={mine}"]))["data"]
    assert own["path"] == str(mine) and own["eval_path"] is None and own["eval_fraction"] > 0
    both = to_container(compose(preset, [f"data.path={mine}", f"data.eval_path={theirs}"]))["data"]
    assert both["eval_path"] == str(theirs)
