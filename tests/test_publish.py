"""Model card metadata, the push allowlist (dry run), and no Hub token anywhere after train + merge + push."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from finetune import console as cli
from finetune.adapters import card, push, serving
from finetune.config.compose import compose, to_container
from finetune.errors import IntegrityError

from helpers import PROJECT, run_cli, tiny_overrides

HOSTILE = "evil\n---\nlicense: mit\nbase_model: /home/attacker"


def parsed_metadata(text: str) -> dict:
    """The card's YAML as the Hub's own parser (huggingface_hub.ModelCard) reads it."""
    return ModelCard(text).data.to_dict()


def test_card_metadata_is_exact_with_hostile_strings_and_never_a_local_base(tmp_path):
    config = to_container(
        compose(
            "lora_neox20b",
            [
                f"model.name_or_path={tmp_path}/models/neox20b",  # a local copy: the card still names the Hub id
                "card.domain=legal",
                "card.datasets=[org/contracts]",
            ],
        )
    )
    # as a config file can hold them (the command line cannot carry line breaks)
    config["card"].update(model_name=HOSTILE, tags=["a: b", "---", "# not a comment", "x\u2028y"])
    text = card.render(None, config, "adapter")
    assert (
        parsed_metadata(text)
        == card.metadata(config, "adapter")
        == {
            "base_model": "EleutherAI/gpt-neox-20b",
            "base_model_relation": "adapter",
            "library_name": "peft",
            "license": "apache-2.0",
            "language": ["en"],
            "pipeline_tag": "text-generation",
            "tags": ["neo-finetune", "lora", "gpt_neox", "a: b", "---", "# not a comment", "x\u2028y", "legal"],
            "datasets": ["org/contracts"],
        }
    )
    body = text.split("\n---\n", 1)[1]
    assert str(tmp_path) not in text  # local paths reduced to names, in metadata and the shown config
    assert "# evil --- license: mit base_model: /home/attacker" in body  # the title is one line of text
    assert "Not legal advice" in body

    local = to_container(compose("demo", [f"model.name_or_path={tmp_path}/tiny", "model.hub_id=null"]))
    meta = parsed_metadata(card.render(None, local, "merged"))
    assert "base_model" not in meta and meta["library_name"] == "transformers"  # no Hub id known: no base_model


def test_serving_report_sends_what_engines_cannot_load_to_merge():
    adapter = {r["engine"]: r for r in serving.report("gpt_neox", "adapter", dora=True)}
    assert adapter["PEFT"]["loads"] == "yes" and adapter["transformers"]["loads"] == "no"  # DoRA: PEFT only
    assert all("merge" in adapter[e]["note"] for e in ("transformers", "vLLM", "TGI", "llama.cpp"))
    merged = {r["engine"]: r["loads"] for r in serving.report("gpt_neo", "merged")}
    assert merged == {
        "transformers": "yes",
        "PEFT": "n/a",
        "vLLM": "no",
        "TGI": "caveat",
        "llama.cpp": "no",
        "CTranslate2": "no",
        "ONNX Runtime": "export",
        "finetune serve": "yes",
    }
    lora = {r["engine"]: r["loads"] for r in serving.report("gptj", "adapter")}
    assert lora["vLLM"] == lora["TGI"] == lora["llama.cpp"] == "no" and lora["finetune serve"] == "yes"
    assert adapter["finetune serve"]["loads"] == "no" and "merge" in adapter["finetune serve"]["note"]  # DoRA


def test_medical_card_carries_its_caution():
    config = to_container(compose("demo", ["card.domain=medical"]))
    assert "Not medical advice" in card.render(None, config, "adapter")


@pytest.fixture(scope="module")
def trained_run(tiny_models, tmp_path_factory) -> Path:
    """A real (short) LoRA run on tiny NeoX, trained and merged through the CLIs with HF_TOKEN set to a canary."""
    root = tmp_path_factory.mktemp("publish")
    run_dir = root / "run"
    env = {"HF_TOKEN": CANARY, "HF_HUB_OFFLINE": "1"}
    logs = []
    train = run_cli(
        "conf=demo",
        *tiny_overrides(
            "neox", tiny_models["neox"], run_dir, "trainer.max_steps=2", "card.domain=medical", "card.tags=[clinic]"
        ),
        env=env,
    )
    merge = _module("finetune.merge", str(run_dir), env=env)
    for result in (train, merge):
        assert result.returncode == 0, result.stderr[-3000:]
        logs += [result.stdout, result.stderr]
    (root / "logs.txt").write_text("\n".join(logs))
    return run_dir


CANARY = "hf_CANARYtokenDoNotLeak0123456789abcdef"


def _module(module: str, *args: str, env: dict | None = None):
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **(env or {})},
        check=False,
    )


def test_dry_run_stages_exactly_the_allowlist(trained_run):
    adapter = trained_run / "adapter"
    (adapter / "optimizer.pt").write_bytes(b"not for publishing")  # stray files never ride along
    (adapter / "training_args.bin").write_bytes(b"pickle")
    result = _module("finetune.push", str(trained_run), "repo_id=me/neox-medical", "dry_run=true")
    assert result.returncode == 0, result.stderr
    staged = sorted(p.name for p in (trained_run / "push_staging").iterdir() if p.name != push.STAGING_MARKER)
    assert staged == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "base_model.json",
        "chat_template.jinja",
        "serving.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert all(name in result.stdout for name in staged) and "nothing uploaded" in result.stdout
    readme = (trained_run / "push_staging" / "README.md").read_text()
    meta = parsed_metadata(readme)
    assert meta["library_name"] == "peft" and "medical" in meta["tags"] and "clinic" in meta["tags"]
    assert "| vLLM | no |" in readme and "python -m finetune.merge RUN_DIR" in readme  # serving: merge to serve
    assert "Not medical advice" in readme and "| loss |" in readme

    merged = _module(
        "finetune.push",
        str(trained_run),
        "repo_id=me/neox-medical-merged",
        "merged=true",
        "dry_run=true",
        f"staging={trained_run / 'merged_staging'}",
    )
    assert merged.returncode == 0, merged.stderr
    staged = sorted(p.name for p in (trained_run / "merged_staging").iterdir() if p.name != push.STAGING_MARKER)
    assert staged == [
        "README.md",
        "chat_template.jinja",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "serving.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    readme = (trained_run / "merged_staging" / "README.md").read_text()
    assert parsed_metadata(readme)["library_name"] == "transformers" and "Merge check (full)" in readme


def test_token_never_on_the_command_line_and_never_published(trained_run, monkeypatch):
    result = _module("finetune.push", str(trained_run), f"token={CANARY}")
    assert result.returncode == 2 and "HF_TOKEN" in result.stderr and CANARY not in result.stderr

    monkeypatch.setenv("HF_TOKEN", CANARY)
    opts = cli.parse(
        [str(trained_run), "dry_run=true", f"staging={trained_run / 'leak_staging'}"], push.OPTIONS, "target"
    )
    config = trained_run / "config.yaml"
    original = config.read_text()
    try:  # a token pasted into the card's description ends up in README.md: the push refuses
        config.write_text(original.replace("description: null", f"description: my token is {CANARY}"))
        with pytest.raises(IntegrityError, match="token appears in README.md"):
            push.run(opts)
    finally:
        config.write_text(original)


def test_canary_token_absent_from_everything_written(trained_run):
    result = _module(
        "finetune.push",
        str(trained_run),
        "repo_id=me/canary",
        "dry_run=true",
        f"staging={trained_run / 'canary_staging'}",
        env={"HF_TOKEN": CANARY},
    )
    assert result.returncode == 0, result.stderr
    leaks = [str(p) for p in trained_run.parent.rglob("*") if p.is_file() and CANARY.encode() in p.read_bytes()]
    assert leaks == [] and CANARY not in result.stdout + result.stderr
    # the run, its checkpoints, the merge and the staging were all searched
    assert len(list(trained_run.rglob("*"))) > 30
    adapter_config = json.loads((trained_run / "adapter" / "adapter_config.json").read_text())
    assert not adapter_config["base_model_name_or_path"].startswith("/")
