"""finetune.plan: parameter counts from the shipped configs, peft's trainable counts, the memory model's consistency,
the CLI's errors and the preset header lines. Real configs and models, nothing mocked, no Hub (conftest)."""

from __future__ import annotations

import functools
import importlib.util
import subprocess
import sys

import pytest

from finetune.config.compose import compose, to_container
from finetune.plan import planning, render
from finetune.plan.activations import layer_saved_bytes
from finetune.plan.architecture import adapter as planned_adapter
from finetune.plan.architecture import architecture, shipped_config_path
from finetune.plan.hardware import find_gpu
from finetune.plan.setup import setup_of

from helpers import PROJECT, tiny_overrides

# Published totals (model cards, the GPT-NeoX-20B paper, the GPT-J README) and Pythia's non-embedding counts
PUBLISHED_TOTALS = {
    "EleutherAI/gpt-neo-125m": 125_198_592,
    "EleutherAI/gpt-neo-1.3B": 1_315_575_808,
    "EleutherAI/gpt-neo-2.7B": 2_651_307_520,
    "EleutherAI/gpt-j-6b": 6_053_381_344,
    "EleutherAI/gpt-neox-20b": 20_554_567_680,
    "EleutherAI/pythia-70m": 70_426_624,
    "EleutherAI/pythia-160m": 162_322_944,
    "EleutherAI/pythia-410m": 405_334_016,
    "EleutherAI/pythia-1b": 1_011_781_632,
    "EleutherAI/pythia-1.4b": 1_414_647_808,
    "EleutherAI/pythia-2.8b": 2_775_208_960,
    "EleutherAI/pythia-6.9b": 6_857_302_016,
    "EleutherAI/pythia-12b": 11_846_072_320,
}
PYTHIA_NON_EMBEDDING = {  # the Pythia model card's table
    "EleutherAI/pythia-70m": 18_915_328,
    "EleutherAI/pythia-160m": 85_056_000,
    "EleutherAI/pythia-410m": 302_311_424,
    "EleutherAI/pythia-1b": 805_736_448,
    "EleutherAI/pythia-1.4b": 1_208_602_624,
    "EleutherAI/pythia-2.8b": 2_517_652_480,
    "EleutherAI/pythia-6.9b": 6_444_163_072,
    "EleutherAI/pythia-12b": 11_327_027_200,
}
FAMILY = {"gpt-neo-": "gpt_neo", "gpt-j-": "gptj", "pythia-": "gpt_neox", "gpt-neox-": "gpt_neox"}
TINY_FAMILY = {"neo": "gpt_neo", "neox": "gpt_neox", "gptj": "gptj"}


def hub_model(hub_id: str) -> dict:
    family = next(f for prefix, f in FAMILY.items() if prefix in hub_id)
    return {"name_or_path": hub_id, "hub_id": hub_id, "family": family, "tiny": None}


def plan_of(preset: str, *overrides: str, **options):
    return planning.plan_preset(preset, list(overrides), **options)


def line(result, name: str) -> int:
    return next(m.bytes for m in result.memory if m.name.startswith(name))


@pytest.mark.parametrize("hub_id", sorted(PUBLISHED_TOTALS))
def test_shipped_configs_match_published_parameter_counts(hub_id):
    arch = architecture(hub_model(hub_id))
    assert abs(arch.total_params - PUBLISHED_TOTALS[hub_id]) / PUBLISHED_TOTALS[hub_id] < 0.01
    if hub_id in PYTHIA_NON_EMBEDDING:  # exact: two untied vocab x hidden embeddings apart
        assert arch.total_params - arch.embedding_params - arch.output_embedding_params == PYTHIA_NON_EMBEDDING[hub_id]


def test_every_hub_model_in_conf_has_a_shipped_config():
    from omegaconf import OmegaConf

    from finetune.config.compose import CONF_DIR

    for path in (CONF_DIR / "model").glob("*.yaml"):
        hub_id = OmegaConf.load(path).get("hub_id")
        if hub_id:
            assert shipped_config_path({"hub_id": hub_id}) is not None, f"{path.name}: no config for {hub_id}"


@pytest.mark.parametrize("arch", ["neo", "neox", "gptj"])
def test_local_folder_config_counts_like_the_real_model(tiny_models, arch):
    from transformers import AutoModelForCausalLM

    model = {"name_or_path": str(tiny_models[arch]), "family": TINY_FAMILY[arch], "tiny": None}
    real = AutoModelForCausalLM.from_pretrained(tiny_models[arch])
    assert architecture(model).total_params == sum(p.numel() for p in real.parameters())


@pytest.mark.parametrize("arch,strategy", [("neo", "lora"), ("neox", "lora"), ("gptj", "dora")])
def test_adapter_trainable_count_is_what_peft_reports_on_the_real_model(tiny_models, tmp_path, arch, strategy):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from finetune.models import strategy as strategies

    cfg = to_container(
        compose("demo", tiny_overrides(arch, tiny_models[arch], tmp_path / "run", f"strategy={strategy}"))
    )
    real = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_models[arch]), strategies.peft_config(cfg["strategy"])
    )
    trainable, _ = real.get_nb_trainable_parameters()
    planned = planned_adapter(cfg["model"], cfg["strategy"], architecture(cfg["model"]))
    assert planned.trainable == trainable


def saved_tensor_bytes(arch: str, layers: int, strategy_section: dict, batch: int, length: int) -> int:
    """Bytes of the distinct storages autograd keeps after a forward of a real tiny backbone (fp32, CPU)."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from finetune.models import neo_attention, strategy, tiny

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        tiny.model_config(arch, layers=layers), attn_implementation="sdpa" if arch == "neox" else "eager"
    )
    neo_attention.enable(model)  # what finetune.models.load_model does for GPT-Neo
    peft_config = strategy.peft_config(strategy_section)
    model = get_peft_model(model, peft_config).get_base_model() if peft_config else model
    model.train()
    fixed = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    kept = {}

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in fixed:
            kept[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    ids = torch.randint(0, 1000, (batch, length))
    mask = torch.ones_like(ids)
    mask[-1, -8:] = 0  # a padded batch, as SFT batches are
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        getattr(model, model.base_model_prefix)(input_ids=ids, attention_mask=mask, use_cache=False)
    return sum(kept.values())


@pytest.mark.parametrize("arch,strategy", [("neo", "lora"), ("neox", "lora"), ("neox", "full")])
def test_layer_activation_term_is_what_a_real_layer_keeps_for_backward(arch, strategy):
    overrides = [
        f"model={planner_model(arch)}",
        f"strategy={strategy}",
        "model.dtype=float32",
        "trainer.bf16=false",
        "data.max_length=64",
        "trainer.per_device_train_batch_size=2",
    ]
    resolved = to_container(compose("demo", overrides))
    arch_facts = architecture(resolved["model"])
    adapter = planned_adapter(resolved["model"], resolved["strategy"], arch_facts)
    setup = setup_of(resolved, find_gpu("cpu"))
    planned = layer_saved_bytes(arch_facts, adapter, set(adapter.wrapped[0]) if adapter else set(), setup)
    real = (
        saved_tensor_bytes(arch, 4, resolved["strategy"], 2, 64)
        - saved_tensor_bytes(arch, 2, resolved["strategy"], 2, 64)
    ) / 2
    assert planned == real


def planner_model(arch: str) -> str:
    return {"neo": "tiny_neo", "neox": "tiny_neox", "gptj": "tiny_gptj"}[arch]


def test_gradient_checkpointing_reduces_activations():
    without = plan_of("lora_neox20b", "data.max_length=2048", "trainer.gradient_checkpointing=false")
    with_ = plan_of("lora_neox20b", "data.max_length=2048", "trainer.gradient_checkpointing=true")
    assert line(with_, "activations") < line(without, "activations") / 5
    assert with_.activations_with_checkpointing == line(with_, "activations")
    assert without.activations_with_checkpointing == line(with_, "activations")


def test_preference_objectives_plan_two_sequences_per_row_and_the_reference():
    sft = plan_of("lora_neox20b", "data=demo_prefs", "trainer.gradient_checkpointing=false")
    dpo = plan_of("lora_neox20b", "data=demo_prefs", "objective=dpo", "trainer.gradient_checkpointing=false")
    orpo = plan_of("lora_neox20b", "data=demo_prefs", "objective=orpo", "trainer.gradient_checkpointing=false")
    assert line(dpo, "activations") == pytest.approx(2 * line(sft, "activations"), rel=0.02)  # chosen + rejected
    assert dpo.tokens_per_second < orpo.tokens_per_second == sft.tokens_per_second  # DPO adds the reference forward
    assert not any(m.name.startswith("reference model") for m in dpo.memory)  # LoRA: the adapter switched off
    full = plan_of("full_neo125m", "data=demo_prefs", "objective=dpo")
    precomputed = plan_of("full_neo125m", "data=demo_prefs", "objective=dpo", "objective.precompute_ref_log_probs=true")
    assert line(full, "reference model") == full.total_params * 2  # a frozen bf16 copy (H100: bf16 weights)
    assert not any(m.name.startswith("reference model") for m in precomputed.memory)
    assert any("each row is 2 sequences" in note for note in dpo.notes)


def test_zero3_on_two_gpus_halves_the_training_state():
    def state(result):
        return sum(line(result, name) for name in ("trainable weights", "gradients", "optimizer states"))

    cfg = compose("full_neox20b")  # the library entry point: a composed config, planned twice
    one = planning.plan(cfg, "h100-80gb", num_gpus=1)
    two = planning.plan(cfg, "h100-80gb", num_gpus=2)
    assert state(two) == pytest.approx(state(one) / 2, rel=0.01)


def test_qlora_frozen_weights_are_about_a_quarter_of_bf16():
    lora = plan_of("lora_neox20b", gpu="a100-80gb")
    qlora = plan_of("qlora_neox20b", gpu="a100-80gb")
    ratio = line(qlora, "frozen weights") / line(lora, "frozen weights")
    assert 0.25 < ratio < 0.30  # NF4 + constants is 0.258 of bf16; embeddings and LM head stay bf16


def test_lora_adapter_is_fp32_and_optimizer_is_two_fp32_moments():
    result = plan_of("lora_neox20b")
    assert result.trainable_params == 69_206_016  # r=16 on the four projections of 44 layers
    assert line(result, "trainable weights") == 69_206_016 * 4
    assert line(result, "optimizer states") == 69_206_016 * 8


def test_a_config_that_does_not_fit_gets_suggestions_that_fit_when_replanned():
    result = plan_of("lora_neox20b", "data.max_length=2048", gpu="a100-40gb")
    assert result.fits is False and result.suggestions
    first = result.suggestions[0]
    assert first.fits
    options = {"gpu": "a100-40gb", "num_gpus": first.num_gpus}
    overrides = ["data.max_length=2048", *[o for o in first.overrides if not o.startswith("num_gpus=")]]
    replanned = plan_of("lora_neox20b", *overrides, **options)
    assert replanned.fits and replanned.total_bytes == first.total_bytes


@functools.cache
def without_checkpointing(preset: str) -> dict:
    return to_container(compose(preset, ["trainer.gradient_checkpointing=false"]))


def activations_at(preset: str, length: int, attention: str | None = None) -> int:
    cfg = without_checkpointing(preset)  # a resolved dict plans too
    model = {**cfg["model"], "attn_implementation": attention or cfg["model"]["attn_implementation"]}
    return line(
        planning.plan({**cfg, "model": model, "data": {**cfg["data"], "max_length": length}}, "cpu"), "activations"
    )


def test_eager_attention_scores_grow_with_the_square_of_the_length():
    # eager GPT-Neo keeps b x heads x s x s fp32 scores; SDPA (NeoX's, and ours for GPT-Neo) keeps no s x s tensor per
    # head
    assert activations_at("lora_neo125m", 1024, "eager") / activations_at("lora_neo125m", 512, "eager") > 2.2
    assert activations_at("lora_neo125m", 1024) / activations_at("lora_neo125m", 512) < 2.1
    assert activations_at("lora_pythia1b", 1024) / activations_at("lora_pythia1b", 512) < 2.1


def test_time_uses_max_steps_when_set():
    result = plan_of("lora_neox20b", "trainer.max_steps=100")
    assert result.run_steps == 100
    assert result.run_seconds == pytest.approx(100 * result.step_seconds)


def test_json_output_has_the_numbers():
    import json

    data = json.loads(json.dumps(render.as_json(plan_of("lora_pythia1b", gpu="l4-24gb"))))
    assert data["gpu"]["key"] == "l4-24gb" and data["fits"] is True
    assert sum(m["bytes"] for m in data["memory"]) == data["total_bytes"]


def test_unknown_gpu_exits_2_with_a_suggestion():
    out = subprocess.run(
        [sys.executable, "-m", "finetune.plan", "conf=demo", "gpu=H100-80G"],
        check=False,
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert "did you mean 'h100-80gb'" in out.stderr


def test_gpu_names_are_case_insensitive():
    assert find_gpu("H100_80GB").key == "h100-80gb"


def test_a_plan_that_does_not_fit_and_an_out_of_memory_share_one_list_of_fixes():
    from finetune.train import oom

    cfg = compose("lora_neox20b", ["data.max_length=2048"])
    suggested = {s.overrides[0] for s in planning.plan(cfg, "a100-40gb").suggestions}
    advised = {line.split()[0] for line in oom.fixes(cfg, "train")}
    assert {"strategy=qlora", "distributed=zero3"} <= suggested & advised
    assert "distributed=zero3_offload" in suggested - advised  # CPU offload: the planner's numbers only


def test_problems_of_this_machine_become_notes():
    result = plan_of("demo", "output_dir=.", gpu="cpu")
    assert any(n.startswith("on this machine training would stop: output_dir: '.'") for n in result.notes)


def test_the_header_flags_point_to_the_developer_script():
    from finetune.errors import ConfigError
    from finetune.plan import cli

    with pytest.raises(ConfigError, match=r"--sync-headers: .*python benchmarks/sync_plan_headers.py"):
        cli.parse_args(["--sync-headers"])


def test_preset_headers_state_the_current_plan():
    spec = importlib.util.spec_from_file_location("sync_plan_headers", PROJECT / "benchmarks" / "sync_plan_headers.py")
    headers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(headers)
    stale = headers.sync_headers(write=False)
    assert not stale, (
        "preset header lines differ from the planner's result; regenerate them with "
        f"`{headers.COMMAND}`:\n" + "\n".join(stale)
    )


# Serving (finetune.plan.serving): numbers computed here from the published architecture, not read back from the planner
NEOX20B = {"params": 20_554_567_680, "layers": 44, "hidden": 6144}
GPTJ6B = {"layers": 28, "hidden": 4096}


def serve_of(preset: str, *overrides: str, **options):
    return planning.serve_preset(preset, list(overrides), **options)


def choice(result, name: str):
    return next(c for c in result.choices if c.choice == name)


def test_serving_neox20b_counts_weights_kv_cache_and_adapters_from_the_architecture():
    result = serve_of("lora_neox20b", gpu="h100-80gb", batch=16, context=2048)
    per_token = 2 * NEOX20B["layers"] * NEOX20B["hidden"] * 2  # K and V, every layer, bf16
    assert result.kv_bytes_per_token == per_token == 1_081_344
    bf16, fp32, four, eight = (choice(result, c) for c in ("bf16", "fp32", "4bit", "8bit"))
    assert bf16.weights_bytes == NEOX20B["params"] * 2 and fp32.weights_bytes == NEOX20B["params"] * 4
    assert bf16.kv_cache_bytes == 16 * 2048 * per_token and fp32.kv_cache_bytes == 2 * bf16.kv_cache_bytes
    assert bf16.adapter_bytes == 69_206_016 * 4  # r=16 on the four projections of 44 layers, fp32 as peft loads it
    assert 0.25 < four.weights_bytes / bf16.weights_bytes < 0.30  # NF4 + constants; embeddings and head stay bf16
    assert 0.50 < eight.weights_bytes / bf16.weights_bytes < 0.53
    for c in result.choices:
        parts = (c.weights_bytes, c.adapter_bytes, c.kv_cache_bytes, c.prefill_bytes, c.context_bytes)
        assert c.total_bytes == sum(parts)
    # 38.3 GiB of bf16 weights + 33 GiB of KV cache: over one H100's 71.6 GiB limit, two with device_map=auto
    assert result.default == "bf16" and bf16.fits is False and bf16.gpus_needed == 2
    assert four.fits and four.gpus_needed == 1 and eight.fits


def test_serving_gptj6b_in_bf16_fits_one_h100():
    result = serve_of("lora_gptj6b", gpu="h100-80gb", batch=16, context=2048)
    assert result.kv_bytes_per_token == 2 * GPTJ6B["layers"] * GPTJ6B["hidden"] * 2
    bf16 = choice(result, "bf16")
    assert bf16.fits and bf16.gpus_needed == 1 and bf16.max_batch > 16
    assert bf16.weights_bytes == result.total_params * 2


def test_max_batch_is_the_largest_batch_that_fits():
    most = choice(serve_of("lora_neox20b", batch=1, context=2048), "bf16").max_batch
    assert 0 < most < 16
    assert choice(serve_of("lora_neox20b", batch=most, context=2048), "bf16").fits
    assert not choice(serve_of("lora_neox20b", batch=most + 1, context=2048), "bf16").fits


def test_device_map_auto_spreads_weights_one_gpu_cannot_hold():
    result = serve_of("lora_neox20b", gpu="a100-40gb", batch=1, context=2048)  # 38.3 GiB of bf16 weights > 36 GiB
    assert choice(result, "bf16").gpus_needed == 2 and choice(result, "fp32").gpus_needed == 3
    assert choice(result, "4bit").gpus_needed == 1


def test_a_qlora_preset_is_served_4bit_by_default():
    result = serve_of("qlora_neox20b")
    assert result.default == "4bit" and any("4-bit base by default" in n for n in result.notes)


@pytest.mark.parametrize("arch", ["neox", "gptj"])
def test_quantized_weight_bytes_are_what_bitsandbytes_holds(tiny_models, arch):
    import bitsandbytes as bnb
    import torch
    from transformers import AutoModelForCausalLM

    from finetune.models import load
    from finetune.plan.serving import weight_bytes

    planned = architecture({"name_or_path": str(tiny_models[arch]), "family": TINY_FAMILY[arch], "tiny": None})
    quantization = {
        "4bit": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True},
        "8bit": {"load_in_8bit": True},
    }
    for quant, settings in quantization.items():
        model = AutoModelForCausalLM.from_pretrained(
            tiny_models[arch], dtype=torch.bfloat16, quantization_config=load.bnb_config(settings), device_map="cpu"
        )
        held = sum(p.numel() * p.element_size() for p in model.parameters())
        for module in model.modules():  # the quantization constants: NF4 absmax (8-bit, with fp32 ones on top), SCB
            if isinstance(module, bnb.nn.Linear4bit):
                state = module.weight.quant_state
                held += state.absmax.numel() * state.absmax.element_size()
                held += state.state2.absmax.numel() * state.state2.absmax.element_size() if state.nested else 0
            elif isinstance(module, bnb.nn.Linear8bitLt):
                held += module.weight.SCB.numel() * module.weight.SCB.element_size()
        assert weight_bytes(quant, planned)[0] == held, quant


def test_kv_cache_per_token_is_what_the_model_caches(tiny_models):
    import torch
    from transformers import AutoModelForCausalLM

    from finetune.plan.serving import kv_bytes_per_token

    model = AutoModelForCausalLM.from_pretrained(tiny_models["neox"], dtype=torch.bfloat16).eval()
    with torch.no_grad():
        cache = model(torch.ones(2, 10, dtype=torch.long), use_cache=True).cache
    cached = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    planned = architecture({"name_or_path": str(tiny_models["neox"]), "family": "gpt_neox", "tiny": None})
    assert cached == 2 * 10 * kv_bytes_per_token(planned, 2)


def test_serve_mode_cli_prints_every_choice_and_refuses_serve_options_without_it(capsys):
    from finetune.errors import ConfigError
    from finetune.plan import cli

    cli.main(["conf=lora_neox20b", "serve=true", "serve_batch=16", "serve_context=2048"])
    out = capsys.readouterr().out
    assert "KV cache: 2 (K, V) x 44 layers x 6144 x 2 B = 1,081,344 B per token" in out
    assert all(f"  {c}" in out for c in ("bf16*", "fp16", "fp32", "4bit", "8bit"))
    assert "2 x h100-80gb (more than num_gpus=1)" in out
    with pytest.raises(ConfigError, match="serve_batch=: only with serve=true"):
        cli.parse_args(["conf=lora_neox20b", "serve_batch=4"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["conf=lora_neox20b", "serve=true", "serve_context=4096"])
    assert exit_info.value.code == 2 and "has a context of 2048 tokens" in capsys.readouterr().err
