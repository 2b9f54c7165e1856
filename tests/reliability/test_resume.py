"""Exact resume, torn and corrupt checkpoints, preemption, resume drift (RELIABILITY_PLAN CK-01..CK-09, CK-13)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune.errors import EXIT_CONFIG, EXIT_INTEGRITY, EXIT_PREEMPTED
from finetune.runs import checkpoints

from harness import finetune, overrides


def adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def assert_same_run(run_dir: Path, reference: Path) -> None:
    """Bitwise-equal adapter, and the same batches and losses at every optimizer step."""
    ours, theirs = adapter(run_dir), adapter(reference)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours), "adapter differs from the uninterrupted run"
    steps = (run_dir / "train_steps.jsonl").read_text().splitlines()
    assert [json.loads(s)["step"] for s in steps] == list(range(1, 11))
    assert steps == (reference / "train_steps.jsonl").read_text().splitlines()


def test_kill_9_then_resume_reproduces_the_uninterrupted_run_bit_for_bit(killed, reference, tiny_models):
    assert [c.name for c in checkpoints.candidates(killed / "checkpoints")] == ["checkpoint-6", "checkpoint-3"]
    assert json.loads((killed / "run.json").read_text())["status"] == "running"  # SIGKILL: nobody could say otherwise
    result = finetune(overrides(tiny_models["neox"], killed, "resume=true"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from" in result.stderr and "checkpoint-6" in result.stderr
    assert_same_run(killed, reference)
    record = json.loads((killed / "run.json").read_text())
    assert record["status"] == "completed" and record["resumed_from"] == "checkpoint-6"
    assert record["previous_attempts"][-1]["status"] == "running"


@pytest.mark.parametrize(
    "damage", ["truncate", "flip_byte", "delete_file", "unexpected_file", "no_manifest", "pickle_swap"]
)
def test_every_kind_of_damage_is_detected_and_names_the_file(killed, damage):
    newest = killed / "checkpoints" / "checkpoint-6"
    weights = newest / "adapter_model.safetensors"
    assert checkpoints.verify(newest) is None
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif damage == "flip_byte":  # inside tensor data: the safetensors header still parses
        data = bytearray(weights.read_bytes())
        data[-10] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "delete_file":
        (newest / "optimizer.pt").unlink()
    elif damage == "unexpected_file":
        (newest / "notes.txt").write_text("hello")
    elif damage == "no_manifest":
        (newest / checkpoints.MANIFEST).unlink()
    else:  # the adapter swapped for a pickle
        weights.unlink()
        (newest / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")
    problem = checkpoints.verify(newest)
    expected = {
        "truncate": "adapter_model.safetensors has",
        "flip_byte": "adapter_model.safetensors has sha256",
        "delete_file": "optimizer.pt is missing",
        "unexpected_file": "notes.txt is not in the manifest",
        "no_manifest": "MANIFEST.json is missing: the save did not finish",
        "pickle_swap": "adapter_model.bin is not in the manifest",
    }[damage]
    assert problem is not None and expected in problem


def test_corrupt_newest_checkpoint_is_set_aside_and_resume_falls_back(killed, reference, tiny_models):
    weights = killed / "checkpoints" / "checkpoint-6" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    result = finetune(overrides(tiny_models["neox"], killed, "resume=true"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "checkpoint checkpoint-6 is incomplete or corrupt and was set aside" in result.stderr
    assert "adapter_model.safetensors has sha256" in result.stderr and "resuming from" in result.stderr
    quarantined = list((killed / "checkpoints" / checkpoints.QUARANTINE).glob("checkpoint-6-*.reason.txt"))
    assert len(quarantined) == 1 and "corrupted" in quarantined[0].read_text()
    assert_same_run(killed, reference)  # resumed from checkpoint-3: still the same run


def test_kill_during_a_save_never_promotes_the_torn_checkpoint(tiny_models, reference, tmp_path):
    """SIGKILL after checkpoint-6's files are written but before its manifest; save_total_limit=1 (CK-02, CK-13)."""
    run_dir = tmp_path / "run"
    args = overrides(tiny_models["neox"], run_dir, "trainer.save_total_limit=1")
    result = finetune(args, fault=("KILL_IN_SAVE", 6))
    assert result.returncode == -9
    # the only good one survives
    assert [c.name for c in checkpoints.candidates(run_dir / "checkpoints")] == ["checkpoint-3"]
    assert (run_dir / "checkpoints" / checkpoints.STAGING / "checkpoint-6").is_dir()  # the torn save stayed in staging
    result = finetune([*args, "resume=true"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (run_dir / "checkpoints" / checkpoints.STAGING).exists()
    assert_same_run(run_dir, reference)
    # rotation kept the newest (the Trainer also saves the last step)
    assert [c.name for c in checkpoints.candidates(run_dir / "checkpoints")] == ["checkpoint-10"]


@pytest.mark.parametrize("signal_name", ["TERM", "USR1"])
def test_preemption_commits_a_checkpoint_exits_75_and_resumes_exactly(signal_name, tiny_models, reference, tmp_path):
    run_dir = tmp_path / "run"
    args = overrides(tiny_models["neox"], run_dir)
    result = finetune(args, fault=(signal_name, 4))
    assert result.returncode == EXIT_PREEMPTED, result.stderr[-3000:]
    assert f"SIG{signal_name} received" in result.stderr and "resume=true" in result.stderr
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "preempted" and record["exit_code"] == EXIT_PREEMPTED
    # stopped at the next step boundary
    assert checkpoints.candidates(run_dir / "checkpoints")[0].name == "checkpoint-5"
    assert checkpoints.verify(run_dir / "checkpoints" / "checkpoint-5") is None
    assert not (run_dir / "adapter").exists()  # no final artefacts from an unfinished run
    result = finetune([*args, "resume=true"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_run(run_dir, reference)


def test_resume_without_a_complete_checkpoint_exits_3_and_auto_starts_fresh(killed, tiny_models):
    for candidate in checkpoints.candidates(killed / "checkpoints"):
        (candidate / checkpoints.MANIFEST).unlink()
    result = finetune(overrides(tiny_models["neox"], killed, "resume=true", "trainer.max_steps=2"))
    assert result.returncode == EXIT_INTEGRITY
    assert (
        "no complete checkpoint in" in result.stderr
        and "checkpoint-6: " in result.stderr
        and "resume=auto" in result.stderr
    )
    result = finetune(overrides(tiny_models["neox"], killed, "resume=auto", "trainer.max_steps=2"))
    assert result.returncode == 0 and "starting from step 0 (resume=auto)" in result.stderr


def test_resume_with_changed_settings_is_refused_field_by_field(killed, tiny_models):
    result = finetune(
        overrides(tiny_models["neox"], killed, "resume=true", "strategy.r=8", "seed=7", "trainer.max_steps=12")
    )
    assert result.returncode == EXIT_CONFIG
    assert "resume: strategy.r: 16 in the checkpoint -> 8 now" in result.stderr
    assert "resume: seed: 42 in the checkpoint -> 7 now" in result.stderr
    assert "resume: max_steps: 10 in the checkpoint -> 12 now" in result.stderr
    assert "resume_allow_drift=[strategy,seed,max_steps]" in result.stderr
    assert checkpoints.verify(killed / "checkpoints" / "checkpoint-6") is None  # nothing was touched
    result = finetune(
        overrides(tiny_models["neox"], killed, "resume=true", "trainer.max_steps=12", "resume_allow_drift=[max_steps]")
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((killed / "run.json").read_text())["global_steps"] == 12


def test_resuming_a_completed_run_changes_nothing(reference, tiny_models, tmp_path):
    run_dir = Path(shutil.copytree(reference, tmp_path / "run"))
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
    result = finetune(overrides(tiny_models["neox"], run_dir, "resume=true"))
    assert result.returncode == 0 and "run already complete" in result.stderr
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize(
    "fault", [("KILL_IN_SAVE", 10), ("KILL_AFTER_SAVE", 10)], ids=["during_last_save", "after_last_save"]
)
def test_kill_at_the_last_save_then_resume_finishes_without_another_step(fault, tiny_models, reference, tmp_path):
    """The ends of a run: resuming from checkpoint-10 of 10 writes the final adapter, trains no step 11 (issue 20)."""
    run_dir = tmp_path / "run"
    args = overrides(tiny_models["neox"], run_dir)
    assert finetune(args, fault=fault).returncode == -9
    result = finetune([*args, "resume=true"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "11/10" not in result.stderr + result.stdout
    assert_same_run(run_dir, reference)
    assert json.loads((run_dir / "run.json").read_text())["global_steps"] == 10
    assert (run_dir / "adapter" / "README.md").is_file()


@pytest.mark.parametrize("fault", ["KILL_IN_DATA", "KILL_IN_EVAL", "KILL_IN_FINAL_SAVE", "KILL_IN_CARD"])
def test_kill_9_in_every_other_phase_then_resume_gives_the_uninterrupted_run(fault, tiny_models, reference, tmp_path):
    """kill -9 before any checkpoint (data, the evaluation before training), or after the last one (the final adapter's
    weights, its card): resume=auto gives the uninterrupted run's adapter bit for bit and no extra step (issue 20)."""
    run_dir = tmp_path / "run"
    args = overrides(tiny_models["neox"], run_dir, *(["eval_before_training=true"] if fault == "KILL_IN_EVAL" else []))
    if fault == "KILL_IN_EVAL":  # the uninterrupted run with the same settings (the evaluation changes the trajectory)
        reference = tmp_path / "uninterrupted"
        assert finetune(overrides(tiny_models["neox"], reference, "eval_before_training=true")).returncode == 0
    assert finetune(args, fault=(fault, 0)).returncode == -9
    assert json.loads((run_dir / "run.json").read_text())["status"] == "running"
    if fault in ("KILL_IN_FINAL_SAVE", "KILL_IN_CARD"):  # a half-written final folder is never taken as the result
        assert not (run_dir / "adapter" / checkpoints.MANIFEST).exists()
    result = finetune([*args, "resume=auto"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "11/10" not in result.stderr
    assert_same_run(run_dir, reference)
    assert checkpoints.verify(run_dir / "adapter") is None
