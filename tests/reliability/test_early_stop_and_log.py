"""A preemption signal before the first optimizer step stops at the next safe point, whatever the phase; every run's
train.log holds the lines it printed (issue 20, degraded: "SIGTERM during data preparation or the eval before
training", "train.log is 0 bytes in every run")."""

from __future__ import annotations

import json

import pytest

from finetune.errors import EXIT_PREEMPTED

from harness import finetune, overrides


@pytest.mark.parametrize("phase", ["TERM_IN_DATA", "TERM_IN_EVAL"])
def test_sigterm_before_training_stops_at_the_next_safe_point(phase, tiny_models, tmp_path):
    run_dir = tmp_path / "run"
    args = overrides(
        tiny_models["neox"],
        run_dir,
        "eval_before_training=true",
        "sample_generations=2",
        "trainer.eval_strategy=steps",
        "trainer.eval_steps=5",
    )
    result = finetune(args, fault=(phase, 0))
    assert result.returncode == EXIT_PREEMPTED, result.stderr[-3000:]
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "preempted" and record["exit_code"] == EXIT_PREEMPTED
    said = result.stderr
    assert "SIGTERM received" in said and "nothing new was trained" in said
    steps = run_dir / "train_steps.jsonl"
    assert "[finetune] step " not in said and (not steps.exists() or not steps.read_text())  # no step was trained
    assert "eval before training:" not in said  # the evaluation did not run (data) or was cut short (eval)
    assert not (run_dir / "checkpoints").exists() or not any((run_dir / "checkpoints").glob("checkpoint-*"))
    if phase == "TERM_IN_DATA":
        assert "[finetune] model: " not in said and "during data preparation" in said  # the model never loaded
    else:
        assert "[finetune] model: " in said and "during the evaluation before training" in said
    log = (run_dir / "train.log").read_text()
    assert "SIGTERM received" in log and "error: SIGTERM: stopped during" in log and "[finetune] precision:" in log


def test_a_finished_run_logs_every_line_it_printed(reference):
    log = (reference / "train.log").read_text()
    lines = [line.split("] ", 1)[1] for line in log.splitlines() if line.startswith("[20") and "] [finetune] " in line]
    for start in (
        "[finetune] precision:",
        "[finetune] data: ",
        "[finetune] model: ",
        "[finetune] training: ",
        "[finetune] step 10/10",
        "[finetune] trained 10 steps",
        "[finetune] run directory: ",
    ):
        assert any(line.startswith(start) for line in lines), start
