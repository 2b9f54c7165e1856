"""Every config problem is reported before any weights load, all at once, naming the key and the fix."""

from __future__ import annotations

import json

import pytest
import torch

from finetune.config.compose import compose
from finetune.config.validate import validate
from finetune.errors import EXIT_CONFIG, ConfigError

from helpers import run_cli, tiny_overrides


def problems_of(overrides: list[str], preset: str = "demo") -> list[str]:
    with pytest.raises(ConfigError) as caught:
        validate(compose(preset, overrides))
    return caught.value.problems


def test_cli_typos_exit_2_naming_every_key_before_loading(tmp_path):
    out = run_cli(
        "trainer.learning_rat=1e-4", "strategy.lora_alpah=8", "model=gpt_neox_2b", f"output_dir={tmp_path}/run"
    )
    assert out.returncode == EXIT_CONFIG
    assert "unknown key 'trainer.learning_rat'" in out.stderr and "did you mean 'learning_rate'" in out.stderr
    assert "unknown key 'strategy.lora_alpah'" in out.stderr and "did you mean 'lora_alpha'" in out.stderr
    assert "did you mean 'gpt_neox_20b'" in out.stderr
    assert "3 config problems" in out.stderr
    assert not (tmp_path / "run").exists()  # stopped before Hydra created anything


def test_unknown_preset_exits_2_with_suggestion():
    out = run_cli("conf=lora_neox2b", "--cfg", "job")
    assert out.returncode == EXIT_CONFIG
    assert "did you mean 'lora_neox20b'" in out.stderr


def test_keys_added_with_plus_are_still_checked_against_the_libraries():
    problems = problems_of(["+trainer.learning_rat=1", "+strategy.rnak=4", "+data.max_lenght=3", "+learning_rate=2"])
    text = "\n".join(problems)
    assert "unknown key 'trainer.learning_rat' (did you mean 'learning_rate'?)" in text
    assert "unknown key 'strategy.rnak'" in text
    assert "unknown key 'data.max_lenght' (did you mean 'max_length'?)" in text
    assert "unknown key 'learning_rate'" in text


def test_wrong_types_and_ranges_are_all_reported_together():
    problems = problems_of(["data.max_length=abc", "seed=1.5"])
    assert any(p.startswith("data.max_length: expected int") for p in problems)
    assert any(p.startswith("seed: expected int") for p in problems)
    problems = problems_of(
        ["strategy.r=0", "strategy.lora_dropout=1.5", "trainer.learning_rate=-1", "data.eval_fraction=2"]
    )
    assert len(problems) == 4, problems
    assert problems_of(["data.packing=sometimes"]) == ["data.packing: 'sometimes' is not one of true, false, auto"]


def test_sample_repetition_penalty_must_be_positive_and_the_message_says_what_to_set():
    (problem,) = problems_of(["sample_repetition_penalty=0"])
    assert problem.startswith("sample_repetition_penalty=0: must be > 0")
    assert "sample_repetition_penalty=1 (off)" in problem  # the fix
    assert problems_of(["sample_repetition_penalty=-1.2"])[0].startswith("sample_repetition_penalty=-1.2: must be > 0")
    assert problems_of(["sample_repetition_penalty=high"])[0].startswith("sample_repetition_penalty: expected float")
    validate(compose("demo", ["sample_repetition_penalty=1"]))  # accepted: an int is a float here


def test_lora_targets_must_exist_in_the_architecture():
    problems = problems_of(["model=tiny_neox", "strategy.target_modules=[query_key_value,q_proj]"])
    assert len(problems) == 1
    assert "'q_proj' is not a Linear layer of gpt_neox" in problems[0]
    assert "dense_h_to_4h" in problems[0]  # lists what is available


def test_output_embedding_is_never_a_target():
    problems = problems_of(["strategy.target_modules=[q_proj,lm_head]"])
    assert any("'lm_head' is the output embedding" in p for p in problems)


def test_fan_in_fan_out_true_is_refused():
    problems = problems_of(["strategy.fan_in_fan_out=true"])
    assert any(p.startswith("strategy.fan_in_fan_out") for p in problems)


def test_fp16_is_refused_unless_allowed_then_warned_on_gpu_refused_on_cpu():
    problems = problems_of(["trainer.bf16=false", "+trainer.fp16=true"])
    assert any("allow_fp16=true" in p for p in problems)
    allowed = ["trainer.bf16=false", "+trainer.fp16=true", "allow_fp16=true"]
    if torch.cuda.is_available():
        _, warnings = validate(compose("demo", allowed))
        assert any("fp16" in w and "loss_scale" in w for w in warnings)
    else:
        assert any(p.startswith("trainer.fp16 / model.dtype=float16 on CPU") for p in problems_of(allowed))


def test_missing_data_file_and_template_are_named():
    problems = problems_of(["data.path=/nonexistent/rows.jsonl", "data.template=nope"])
    assert any("data.path: '/nonexistent/rows.jsonl': no such file" in p for p in problems)
    assert any(p.startswith("data.template: no template 'nope'") for p in problems)


def test_keys_owned_elsewhere_point_to_the_right_knob():
    problems = problems_of(["+trainer.max_length=64", "+trainer.hub_token=hf_secret", "+trainer.packing=true"])
    text = "\n".join(problems)
    assert "trainer.max_length: set through data.max_length" in text
    assert "trainer.hub_token: set through the HF_TOKEN environment variable" in text
    assert "trainer.packing" in text


def test_qlora_is_accepted_on_cpu_when_bitsandbytes_has_cpu_kernels():
    """bitsandbytes >= 0.50 (a dev dependency) runs NF4 on CPU, so QLoRA validates here; tests/test_qlora.py trains
    it."""
    from finetune.models.strategy import bitsandbytes_problem

    assert bitsandbytes_problem(cuda=False) is None
    validate(compose("demo", ["strategy=qlora"]))  # no ConfigError


def test_model_family_must_match_the_checkpoint(tiny_models):
    problems = problems_of(["model=tiny_neo", f"model.name_or_path={tiny_models['neox']}", "model.tiny=null"])
    assert any("model.family: 'gpt_neo' but" in p and "gpt_neox" in p for p in problems)


def test_gpt_neo_flash_attention_is_refused():
    problems = problems_of(["model.attn_implementation=flash_attention_2"])
    assert any("ignores the local attention window" in p for p in problems)


def test_an_existing_run_is_not_overwritten(tmp_path, tiny_models):
    (tmp_path / "run.json").write_text(json.dumps({"status": "completed"}))
    overrides = tiny_overrides("neo", tiny_models["neo"], tmp_path) + ["overwrite=false"]
    problems = problems_of(overrides)
    assert any("already holds a run" in p and "overwrite=true" in p for p in problems)
    validate(compose("demo", tiny_overrides("neo", tiny_models["neo"], tmp_path) + ["overwrite=true"]))


def test_data_problems_exit_2_before_the_model_loads(tmp_path, tiny_models):
    bad = tmp_path / "rows.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "ouptut": "b"}\n{broken\n')
    out = run_cli(
        *tiny_overrides("neo", tiny_models["neo"], tmp_path / "run"), f"data.path={bad}", "data.eval_path=null"
    )
    assert out.returncode == EXIT_CONFIG, out.stderr
    assert (
        f"{bad}:2: missing field 'output' (did you mean 'ouptut'? map it with data.columns.output=ouptut)" in out.stderr
    )
    assert f"{bad}:3: invalid JSON: Expecting property name enclosed in double quotes (column 2)" in out.stderr
    assert "model:" not in out.stderr  # the model line is printed only after loading
