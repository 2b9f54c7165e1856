"""generate's quant= and device_map= on real tiny runs (bitsandbytes >= 0.50 has CPU 4-bit and 8-bit kernels): the
base loads as bitsandbytes layers and still generates text; a QLoRA adapter is served over the 4-bit base it trained on
unless quant=none, with the same greedy output as peft over that 4-bit base; bad values exit 2 before anything
loads."""

from __future__ import annotations

import json

import bitsandbytes as bnb
import pytest
import torch
import yaml

from finetune.config.compose import compose
from finetune.inference import generate
from finetune.train.run import run

from helpers import tiny_overrides

PROMPT = "What is a tort?"
N = 6  # max_new_tokens
LAYERS = {"4bit": bnb.nn.Linear4bit, "8bit": bnb.nn.Linear8bitLt}


@pytest.fixture(scope="module")
def runs(tiny_models, tmp_path_factory):
    """A LoRA run and a QLoRA run (4-bit NF4 base, double quant, bf16 compute) on tiny NeoX, trained for real."""
    root = tmp_path_factory.mktemp("generate_quant")

    def train(name: str, *extra: str):
        overrides = ["trainer.max_steps=2", "sample_generations=0", "eval_before_training=false", *extra]
        return run(compose("demo", tiny_overrides("neox", tiny_models["neox"], root / name, *overrides)))

    return {"lora": train("lora"), "qlora": train("qlora", "strategy=qlora")}


def quantized_layers(session) -> dict[type, int]:
    """How many of the base's linear layers are each bitsandbytes type (peft's LoRA wrappers hold them as
    base_layer)."""
    counts = {}
    for module in session.model.modules():
        for kind in LAYERS.values():
            if type(module) is kind:
                counts[kind] = counts.get(kind, 0) + 1
    return counts


@pytest.mark.parametrize("quant", ["4bit", "8bit"])
def test_quant_loads_the_base_through_bitsandbytes_and_generates(runs, quant, capsys):
    session = generate.load(runs["lora"], quant=quant, device_map="cpu")
    assert quantized_layers(session).get(LAYERS[quant], 0) > 0
    layers = session.model.base_model.model.gpt_neox.layers.named_modules()
    assert not any(type(m) is torch.nn.Linear and "lora_" not in name for name, m in layers)  # every base linear
    reply = session.generate(PROMPT, max_new_tokens=N)
    assert isinstance(reply, str) and reply.strip()
    assert "QLoRA" not in capsys.readouterr().err  # a LoRA run has no recorded quantization to announce


def test_a_qlora_run_is_served_over_its_4bit_base_as_trained(runs, tiny_models, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    loading = generate.plan(runs["qlora"])
    recorded = json.loads((runs["qlora"] / "adapter" / "base_model.json").read_text())["quantization"]
    assert loading.quant == "4bit" and loading.quantization == recorded
    assert "serving over the 4-bit base this QLoRA adapter trained on" in capsys.readouterr().err
    session = loading.load()
    assert quantized_layers(session).get(bnb.nn.Linear4bit, 0) > 0

    # the model training optimised, built by hand: the run's dtype, its BitsAndBytesConfig, its adapter
    config = yaml.safe_load((runs["qlora"] / "config.yaml").read_text())
    compute = getattr(torch, recorded["bnb_4bit_compute_dtype"])
    base = AutoModelForCausalLM.from_pretrained(
        tiny_models["neox"],
        dtype=getattr(torch, config["model"]["dtype"]),
        quantization_config=BitsAndBytesConfig(**{**recorded, "bnb_4bit_compute_dtype": compute}),
        device_map="cpu",
    )
    model = PeftModel.from_pretrained(base, runs["qlora"] / "adapter").eval()
    tokenizer = AutoTokenizer.from_pretrained(runs["qlora"] / "adapter")
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=False
    )
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    out = model.generate(**ids, do_sample=False, max_new_tokens=N, pad_token_id=tokenizer.eos_token_id)
    expected = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert expected.strip()
    assert session.generate(PROMPT, max_new_tokens=N) == expected


def test_quant_none_serves_a_qlora_adapter_over_full_weights_with_a_warning(runs, capsys):
    session = generate.load(runs["qlora"], quant="none")
    assert "outputs will differ" in capsys.readouterr().err
    assert quantized_layers(session) == {}
    assert session.generate(PROMPT, max_new_tokens=N).strip()


def test_device_map_cpu_gives_the_default_cpu_output(runs):
    placed = generate.load(runs["lora"], device_map="cpu")
    assert placed.model.device.type == "cpu" and quantized_layers(placed) == {}
    default = generate.load(runs["lora"])
    assert placed.generate(PROMPT, max_new_tokens=N) == default.generate(PROMPT, max_new_tokens=N)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["quant=3bit"], "quant=3bit: choose one of 4bit, 8bit, none"),
        (["device_map=gpu"], "device_map=gpu: choose one of auto, cpu, cuda"),
        (["quant=int4", "device_map=balanced"], "device_map=balanced"),
    ],
)
def test_bad_quant_or_device_map_exits_2_before_anything_loads(tmp_path, capsys, args, message):
    # the target does not exist: the option is refused first, so nothing was located, let alone loaded
    with pytest.raises(SystemExit) as exit_info:
        generate.main([str(tmp_path / "no-such-run"), f"prompt={PROMPT}", *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "no such directory" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_device_map_cuda_without_a_gpu_exits_2(runs, capsys):
    with pytest.raises(SystemExit) as exit_info:
        generate.main([str(runs["lora"]), f"prompt={PROMPT}", "device_map=cuda"])
    assert exit_info.value.code == 2
    assert "device_map=cuda: no CUDA GPU here" in capsys.readouterr().err


def test_the_cli_says_what_precision_it_loads(runs, capsys):
    generate.main([str(runs["lora"]), f"prompt={PROMPT}", "quant=8bit", f"max_new_tokens={N}", "device_map=cpu"])
    captured = capsys.readouterr()
    assert captured.out.strip()
    assert "(float32, 8-bit)" in captured.err
