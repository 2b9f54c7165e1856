"""DPO keeps SFT's guarantees: kill -9 then resume, or a preemption (exit 75) then resume, reproduce the uninterrupted
run bit for bit (adapter, and every step's batches and loss); a non-finite loss stops before the update."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from test_resume import assert_same_run

from finetune.errors import EXIT_FAILURE, EXIT_PREEMPTED
from finetune.runs import checkpoints

from harness import finetune, overrides

DPO = ("objective=dpo", "data=demo_prefs")


def dpo(model_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    return overrides(model_dir, run_dir, *DPO, *extra)


@pytest.fixture(scope="module")
def dpo_reference(tiny_models, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("dpo_reference") / "run"
    result = finetune(dpo(tiny_models["neox"], run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def test_dpo_kill_9_then_resume_is_the_uninterrupted_run(dpo_reference, tiny_models, tmp_path):
    run_dir = tmp_path / "run"
    args = dpo(tiny_models["neox"], run_dir)
    assert finetune(args, fault=("KILL", 7)).returncode == -9
    assert [c.name for c in checkpoints.candidates(run_dir / "checkpoints")] == ["checkpoint-6", "checkpoint-3"]
    result = finetune([*args, "resume=true"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_run(run_dir, dpo_reference)
    losses = [json.loads(line)["loss"] for line in (run_dir / "train_steps.jsonl").read_text().splitlines()]
    assert losses[0] == pytest.approx(0.6931, abs=0.01)  # step 1: ln 2, the policy is still the reference


def test_dpo_preemption_exits_75_and_resumes_exactly(dpo_reference, tiny_models, tmp_path):
    run_dir = tmp_path / "run"
    args = dpo(tiny_models["neox"], run_dir)
    result = finetune(args, fault=("TERM", 4))
    assert result.returncode == EXIT_PREEMPTED, result.stderr[-3000:]
    assert checkpoints.candidates(run_dir / "checkpoints")[0].name == "checkpoint-5"
    result = finetune([*args, "resume=true"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_run(run_dir, dpo_reference)


def test_dpo_non_finite_loss_stops_before_the_update(tiny_models, tmp_path):
    run_dir = tmp_path / "run"
    result = finetune(dpo(tiny_models["neox"], run_dir, "trainer.learning_rate=1e30", "trainer.max_grad_norm=0"))
    assert result.returncode == EXIT_FAILURE, result.stderr[-3000:]
    found = re.search(r"the (loss|gradient norm) is (nan|inf) at optimizer step (\d+); stopped before", result.stderr)
    assert found, result.stderr[-2000:]
    assert json.loads((run_dir / "run.json").read_text())["status"] == "failed:nonfinite"
    steps = [json.loads(line)["step"] for line in (run_dir / "train_steps.jsonl").read_text().splitlines()]
    assert steps == list(range(1, int(found.group(3))))  # the bad step never reached the optimizer
