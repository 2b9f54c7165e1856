"""`python -m finetune` with no arguments: the offline demo, through the real CLI, in a subprocess."""

from __future__ import annotations

import json

import pytest

from helpers import run_cli


@pytest.mark.slow
def test_demo_builds_tiny_base_trains_and_writes_a_self_describing_run(tmp_path):
    env = {"NEO_FINETUNE_CACHE": str(tmp_path / "cache")}
    out = run_cli(f"output_dir={tmp_path / 'run'}", env=env)
    assert out.returncode == 0, out.stderr[-4000:]
    run_dir = tmp_path / "run"
    for name in (
        "run.json",
        "config.yaml",
        "data_template.yaml",
        "metrics.json",
        "loss.png",
        "samples.json",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "adapter/tokenizer.json",
        "adapter/chat_template.jinja",
    ):
        assert (run_dir / name).is_file(), name
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "completed" and record["exit_code"] == 0
    assert record["eval_loss_after"] < record["eval_loss_before"] - 0.2  # the held-out loss falls clearly
    assert record["data"]["train_rows"] == 288 and record["data"]["eval_rows"] == 32
    assert "held-out eval loss" in out.stderr and "before training:" in out.stderr and "after training:" in out.stderr
    # stderr is a pipe here: one line per logging step and the summary, no bar redraws, no python-dict logs
    assert "[finetune] step 5/108  loss " in out.stderr and "[finetune] trained 108 steps in " in out.stderr
    assert "\r" not in out.stderr and "{'loss'" not in out.stdout + out.stderr
    # the tiny base was built with the real GPT-Neo structure: local window smaller than the sequence length
    config = json.loads((tmp_path / "cache" / "tiny-gpt-neo" / "config.json").read_text())
    assert config["attention_layers"] == ["global", "local", "global", "local"]
    assert config["window_size"] < record["data"]["token_length"]["max"]
    assert not list(run_dir.rglob("*.bin"))
