"""finetune inspect attention on tiny models: the maps are transformers' own eager weights (GPT-Neo's window cuts
where it should), the CLI writes a PNG and the numbers beside it (base, fine-tuned and their difference), and bad
inputs exit 2 naming the key."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from finetune.config.compose import compose
from finetune.inference import generate
from finetune.inspect import attention, command
from finetune.train.run import run

from helpers import PROJECT, tiny_overrides

LONG = "The court held that the duty of care was owed to the patient, and the hospital was liable " * 3  # ~60 tokens


@pytest.fixture(scope="module")
def neo_run(tiny_models, tmp_path_factory):
    """A two-step LoRA run on tiny GPT-Neo (window 32), trained for real; the tests may write into it."""
    overrides = ["trainer.max_steps=2", "trainer.eval_strategy=no", "eval_before_training=false"]
    return run(
        compose(
            "demo",
            tiny_overrides(
                "neo",
                tiny_models["neo"],
                tmp_path_factory.mktemp("inspect") / "run",
                "sample_generations=0",
                *overrides,
            ),
        )
    )


@pytest.fixture(scope="module")
def neo_session(neo_run):
    return generate.load(neo_run, dtype="float32")


def ids_of(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])


def test_local_layers_see_only_their_window_and_global_layers_everything_before(neo_session):
    model = neo_session.model
    config = model.get_base_model().config
    ids = ids_of(neo_session.tokenizer, LONG)
    t, window = ids.shape[1], config.window_size
    assert t > window + 16  # the window really cuts
    maps = attention.compute(model, ids, config, [0, 1, 2, 3], [0, 1, 2, 3], compare=True)
    assert maps.kinds == ["global", "local", "global", "local"] and maps.window == window
    back = torch.arange(t)[:, None] - torch.arange(t)[None, :]  # i - j
    for weights in (maps.fine_tuned, maps.base):
        torch.testing.assert_close(weights.sum(-1), torch.ones(4, 4, t), atol=1e-5, rtol=0)
        for row, kind in enumerate(maps.kinds):
            outside = (back < 0) | (back >= window) if kind == "local" else back < 0
            assert weights[row][:, outside].abs().max() == 0, maps.title(row)
            assert weights[row][:, ~outside].min() > 0  # everything inside is seen
    assert maps.title(1) == f"L1 local (window {window})" and maps.title(0) == "L0 global"
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert any(p.abs().max() > 0 for p in lora_b)
    assert maps.difference.abs().max() > 1e-4  # a trained adapter moves the attention


@pytest.mark.parametrize("arch", ["neo", "neox", "gptj"])
def test_captured_maps_are_transformers_own_eager_weights(tiny_models, arch):
    """Captured through generate's loading (GPT-Neo there is the project's SDPA layer, NeoX transformers' SDPA),
    switched to eager: equal to a model loaded eager and asked for output_attentions=True."""
    from transformers import AutoModelForCausalLM

    session = generate.load(tiny_models[arch], dtype="float32")
    ids = ids_of(session.tokenizer, LONG)
    reference = AutoModelForCausalLM.from_pretrained(tiny_models[arch], attn_implementation="eager").eval()
    with torch.no_grad():
        expected = reference(input_ids=ids, output_attentions=True).attentions
    layers, heads = [1, 3], [0, 2]
    maps = attention.compute(session.model, ids, session.model.config, layers, heads)
    assert maps.fine_tuned.shape == (2, 2, ids.shape[1], ids.shape[1])
    for row, layer in enumerate(layers):
        torch.testing.assert_close(maps.fine_tuned[row], expected[layer][0, heads], atol=1e-6, rtol=0)


def test_default_layers_sample_evenly_with_both_kinds_of_gpt_neo_layer():
    assert attention.default_layers([None] * 4) == [0, 1, 2, 3]
    rotary = attention.default_layers([None] * 44)
    assert len(rotary) == 8 and rotary[0] == 0 and rotary[-1] == 43
    kinds = ["global", "local"] * 7 + ["global"]  # an even sample of 15 alternating layers picks only global ones
    chosen = attention.default_layers(kinds)
    assert len(chosen) == 8 and chosen[0] == 0 and chosen[-1] == 14
    assert {kinds[i] for i in chosen} == {"global", "local"}


def test_cli_end_to_end_with_the_base_and_the_difference(neo_run):
    out = subprocess.run(
        [sys.executable, "-m", "finetune.inspect", "attention", str(neo_run), "prompt=What is a tort?", "compare=true"],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert out.returncode == 0, out.stderr
    png, numbers = (line for line in out.stdout.splitlines())
    assert png.endswith("attention.png") and numbers.endswith("attention.json")
    folder = neo_run / "inspect"
    assert [p.name for p in folder.iterdir()] == [png.split("/")[-2]] and png.split("/")[-2].startswith("attention-")
    image = _image(png)
    assert image.shape[1] > 2 * image.shape[0]  # three grids side by side: base, fine-tuned, difference
    record = json.loads(open(numbers, encoding="utf-8").read())
    assert record["prompt"] == "What is a tort?" and "### Instruction:\nWhat is a tort?" in record["text"]
    assert record["tokens"] == len(record["token_texts"]) > 32
    assert (record["family"], record["window"], record["dtype"]) == ("gpt_neo", 32, "float32")
    assert record["layers"] == [0, 1, 2, 3] and record["heads"] == [0, 1, 2, 3] and record["compare"]
    changed = False
    for entry in record["per_layer"]:
        for model in ("fine_tuned", "base"):
            numbers_of = entry[model]
            assert [h["head"] for h in numbers_of["heads"]] == [0, 1, 2, 3]
            assert numbers_of["mean_distance"] == pytest.approx(
                sum(h["mean_distance"] for h in numbers_of["heads"]) / 4
            )
            assert 0 < numbers_of["entropy"] <= torch.log(torch.tensor(float(record["tokens"]))).item()
            if entry["kind"] == "local":
                assert all(h["mean_distance"] < 32 for h in numbers_of["heads"])
        changed |= entry["fine_tuned"]["heads"] != entry["base"]["heads"]
    assert changed


def test_a_short_raw_prompt_gets_token_labels_and_reruns_into_its_own_folder(neo_run, tmp_path, capsys):
    out = tmp_path / "maps"
    for _ in range(2):  # the second run replaces what the first wrote
        command.main(
            [
                "attention",
                str(neo_run),
                "prompt=Negligence is a $ tort\nof care",
                "raw=true",
                "layers=1",
                "heads=0,2",
                f"out={out}",
            ]
        )
    assert capsys.readouterr().out.splitlines()[-2:] == [str(out / "attention.png"), str(out / "attention.json")]
    record = json.loads((out / "attention.json").read_text(encoding="utf-8"))
    assert record["text"] == "Negligence is a $ tort\nof care" and record["tokens"] <= attention.MAX_LABELLED
    assert record["layers"] == [1] and record["heads"] == [0, 2] and not record["compare"]
    assert "base" not in record["per_layer"][0] and record["per_layer"][0]["title"] == "L1 local (window 32)"
    assert _image(out / "attention.png").shape[0] > 100
    assert attention.token_labels(["a\n", "$5"]) == ["a\\n", r"\$5"]


@pytest.mark.parametrize(
    "args, named",
    [
        (["attention", "RUN", "prompt=x", "layers=0,4"], ["layers=4", "0 to 3"]),
        (["attention", "RUN", "prompt=x", "heads=-1"], ["heads=-1", "0 to 3"]),
        (["attention", "RUN", "prompt="], ["prompt="]),
        (["attention", "RUN", "prompt=" + "word " * 600, "raw=true"], ["prompt=", "512 tokens"]),
        (["attention", "RUN", "prompt=x", "out=FOREIGN"], ["out=", "not written by inspect"]),
        (["attend", "RUN", "prompt=x"], ["sub-command 'attend'", "did you mean 'attention'"]),
        (["attention", "MODEL", "prompt=x", "compare=true"], ["compare=true", "full weights"]),
    ],
    ids=["layer", "head", "empty-prompt", "too-long", "foreign-out", "sub-command", "compare-full-weights"],
)
def test_bad_input_exits_2_naming_the_key(neo_run, tiny_models, tmp_path, capsys, args, named):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine\n")
    places = {"RUN": str(neo_run), "MODEL": str(tiny_models["neo"]), "out=FOREIGN": f"out={foreign}"}
    with pytest.raises(SystemExit) as exit_:
        command.main([places.get(a, a) for a in args])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert all(part in err for part in named), err
    assert (foreign / "notes.txt").read_text() == "mine\n" and len(list(foreign.iterdir())) == 1


def _image(path):
    from matplotlib import image

    pixels = image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[2] in (3, 4) and pixels.size > 0
    return pixels
