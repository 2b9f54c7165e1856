"""Disk full, out of memory, NaN/inf and empty steps, the run record, secrets and local paths, gradient accumulation
equivalence (RELIABILITY_PLAN CK-12, EN-02, DV-07, NU-01, NU-02, SE-05, SE-07, EN-03)."""

from __future__ import annotations

import errno
import json
import re
from collections import namedtuple

import pytest
import torch
from safetensors.torch import load_file

from finetune.config.compose import compose
from finetune.errors import EXIT_FAILURE, ConfigError, DiskFullError, OutOfMemory
from finetune.runs import checkpoints
from finetune.train.run import run

from harness import finetune, overrides


def test_disk_full_during_a_save_keeps_the_previous_checkpoint(tiny_models, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    real_save = torch.save

    def full_disk_save(obj, path, *args, **kwargs):
        if str(path).endswith("checkpoint-6/optimizer.pt"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk_save)
    with pytest.raises(DiskFullError) as caught:
        run(compose("demo", overrides(tiny_models["neox"], run_dir)))
    message = str(caught.value)
    assert f"no space left on the device of {run_dir / 'checkpoints'} while saving checkpoint-6" in message
    assert "MiB free" in message and "a checkpoint needs about" in message and "checkpoint-3 is intact" in message
    assert [c.name for c in checkpoints.candidates(run_dir / "checkpoints")] == ["checkpoint-3"]
    assert checkpoints.verify(run_dir / "checkpoints" / "checkpoint-3") is None
    assert not list((run_dir / "checkpoints" / checkpoints.STAGING).glob("*"))  # the half-written save is gone
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "failed:disk_full" and record["exit_code"] == EXIT_FAILURE


def test_refuses_to_start_without_room_for_a_checkpoint(tiny_models, tmp_path, monkeypatch):
    import shutil

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 4096, 4096))
    with pytest.raises(
        ConfigError, match=r"output_dir: 0.0 MiB free on the device of .* one checkpoint needs about \d+\.\d MiB"
    ):
        run(compose("demo", overrides(tiny_models["neox"], tmp_path / "run")))


def test_out_of_memory_names_this_runs_fixes_and_keeps_its_checkpoints(tiny_models, tmp_path):
    run_dir = tmp_path / "run"
    result = finetune(overrides(tiny_models["neox"], run_dir), fault=("OOM", 4))
    assert result.returncode == EXIT_FAILURE, result.stderr[-3000:]
    assert "error: out of memory in optimizer step 5: CUDA out of memory. Tried to allocate 2.00 GiB" in result.stderr
    assert "Traceback" not in result.stderr
    # the standard run: batch 4 x accumulation 2, no checkpointing, max_length 384, LoRA
    for fix in (
        "trainer.per_device_train_batch_size=2 trainer.gradient_accumulation_steps=4",
        "trainer.gradient_checkpointing=true",
        "data.max_length=192",
        "strategy=qlora",
        "python -m finetune.plan",
    ):
        assert f"{fix}" in result.stderr, fix
    assert "per_device_eval_batch_size" not in result.stderr  # a training step ran out, not evaluation
    record = json.loads((run_dir / "run.json").read_text())
    assert (
        record["status"] == "failed:oom" and record["exit_code"] == EXIT_FAILURE and "out of memory" in record["error"]
    )
    assert f"the checkpoints committed in {run_dir / 'checkpoints'} are intact" in result.stderr
    newest = checkpoints.candidates(run_dir / "checkpoints")[0]
    assert newest.name == "checkpoint-3" and checkpoints.verify(newest) is None
    assert not (run_dir / "adapter").exists()


def test_out_of_memory_in_evaluation_names_the_eval_batch(tiny_models, tmp_path, monkeypatch):
    from finetune.train.trainer import GuardedSFTTrainer

    prediction_step = GuardedSFTTrainer.prediction_step

    def running_out(self, *args, **kwargs):
        if self.state.global_step == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 512.00 MiB")
        return prediction_step(self, *args, **kwargs)

    monkeypatch.setattr(GuardedSFTTrainer, "prediction_step", running_out)
    cfg = compose(
        "demo",
        overrides(
            tiny_models["neox"],
            tmp_path / "run",
            "trainer.max_steps=3",
            "trainer.eval_strategy=steps",
            "trainer.eval_steps=2",
            "trainer.per_device_eval_batch_size=6",
            "trainer.gradient_checkpointing=true",
        ),
    )
    with pytest.raises(
        OutOfMemory, match=r"out of memory in the evaluation after optimizer step 2: CUDA out of memory"
    ) as raised:
        run(cfg)
    message = str(raised.value)
    assert (
        "trainer.per_device_eval_batch_size=3 (evaluation only" in message
        and "no checkpoint had been committed yet" in message
    )
    assert "gradient_checkpointing" not in message  # already on
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "failed:oom"


def test_out_of_memory_advice_follows_the_run_and_the_phase():
    from finetune.train import oom

    full = compose(
        "demo", ["strategy=full", "trainer.per_device_train_batch_size=1", "trainer.gradient_checkpointing=true"]
    )
    assert oom.fixes(full, "load") == [
        "strategy=lora (adapters only: no optimizer state for the base weights; a new run)",
        "distributed=zero3 across several GPUs (weights, gradients and optimizer state sharded)",
    ]
    training = oom.fixes(full, "train")  # batch 1 and checkpointing on: neither is offered again
    assert not any("batch_size" in fix or "checkpointing" in fix for fix in training) and training[0].startswith(
        "data.max_length="
    )
    assert oom.is_out_of_memory(
        RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")
    )
    assert oom.is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory")) and oom.is_out_of_memory(MemoryError())
    assert not oom.is_out_of_memory(RuntimeError("expected scalar type Float but found BFloat16"))


def test_a_diverging_run_stops_at_the_first_non_finite_step(tiny_models, tmp_path):
    run_dir = tmp_path / "run"
    result = finetune(overrides(tiny_models["neox"], run_dir, "trainer.learning_rate=1e30", "trainer.max_grad_norm=0"))
    assert result.returncode == EXIT_FAILURE
    found = re.search(
        r"error: the (loss|gradient norm) is (nan|inf) at optimizer step (\d+); stopped before the update",
        result.stderr,
    )
    assert found, result.stderr[-2000:]
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "failed:nonfinite"
    steps = [json.loads(line) for line in (run_dir / "train_steps.jsonl").read_text().splitlines()]
    bad_step = int(found.group(3))
    # the bad step never reached the optimizer
    assert bad_step > 1 and [s["step"] for s in steps] == list(range(1, bad_step))
    assert all(s["loss"] == s["loss"] and s["loss"] != 0.0 for s in steps)  # logged raw: no NaN, no 0.0 stand-in


def test_an_optimizer_step_without_trained_tokens_is_refused(tiny_models, tmp_path):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig

    from finetune.errors import NonFiniteError
    from finetune.train.guards import StepLog
    from finetune.train.trainer import GuardedSFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["neox"])
    ids = tokenizer("a prompt with nothing to learn", add_special_tokens=False)["input_ids"]
    data = Dataset.from_dict({"input_ids": [ids] * 4, "labels": [[-100] * len(ids)] * 4})
    trainer = GuardedSFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_models["neox"]),
        args=SFTConfig(
            output_dir=str(tmp_path),
            max_steps=1,
            per_device_train_batch_size=4,
            use_cpu=True,
            report_to="none",
            dataset_kwargs={"skip_prepare_dataset": True},
            max_length=None,
        ),
        train_dataset=data,
        processing_class=tokenizer,
        keep_checkpoints=None,
        run_facts={},
        step_log=StepLog(tmp_path / "steps.jsonl"),
        after_save=lambda folder: None,
    )
    with pytest.raises(NonFiniteError, match="optimizer step 1 has no trained token"):
        trainer.train()


def test_run_record_names_everything_a_rerun_needs(reference):
    record = json.loads((reference / "run.json").read_text())
    assert record["status"] == "completed" and record["exit_code"] == 0
    for key in ("config_hash", "dataset_fingerprint"):
        assert re.fullmatch(r"[0-9a-f]{64}", record[key]), key
    assert re.fullmatch(r"sha256-v2:[0-9a-f]{64}", record["base_model_fingerprint"])  # the full-file fingerprint
    assert record["seed"] == 42 and record["data"]["rows_read"] == 320
    assert {"torch", "transformers", "peft", "trl"} <= set(record["versions"])
    manifest = checkpoints.manifest_of(reference / "checkpoints" / "checkpoint-9")
    assert (
        manifest["run"]["dataset"] == record["dataset_fingerprint"]
        and manifest["run"]["base_model"] == record["base_model_fingerprint"]
    )


def test_a_hub_token_and_local_paths_never_reach_a_file_or_log(tiny_models, tmp_path):
    canary = "hf_" + "CANARY" + "x" * 34
    run_dir = tmp_path / "run"
    result = finetune(
        overrides(tiny_models["neox"], run_dir, "trainer.max_steps=3", "trainer.save_steps=2"), env={"HF_TOKEN": canary}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    token = re.compile(rb"hf_[A-Za-z0-9]{30,}")
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any(p.name == "optimizer.pt" for p in files) and any(p.name == "training_args.json" for p in files)
    leaks = [str(p) for p in files if canary.encode() in p.read_bytes() or token.search(p.read_bytes())]
    assert leaks == [] and canary not in result.stdout + result.stderr
    assert not [p for p in files if p.name == "training_args.bin"]
    local = str(tiny_models["neox"])
    for folder in (run_dir / "adapter", run_dir / "checkpoints" / "checkpoint-2"):
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == "neox"  # the folder's name, not the machine's path
        for name in ("adapter_config.json", "README.md"):
            assert local not in (folder / name).read_text(), f"{folder / name} names the local path"
    assert checkpoints.verify(run_dir / "checkpoints" / "checkpoint-2") is None  # scrubbed before the manifest


def test_gradient_accumulation_gives_the_same_weights(tiny_models, tmp_path):
    """(batch 8, accumulation 1) and (batch 2, accumulation 4) on variable-length rows: the same update (NU-01)."""
    # SGD: Adam divides by ~0 gradients and magnifies rounding
    common = [
        "trainer.max_steps=3",
        "trainer.save_strategy=no",
        "strategy.lora_dropout=0.0",
        "trainer.lr_scheduler_type=constant",
        "trainer.optim=sgd",
        "trainer.learning_rate=0.5",
    ]
    results = []
    for batch, accumulation in ((8, 1), (2, 4)):
        run_dir = tmp_path / f"b{batch}"
        run(
            compose(
                "demo",
                overrides(
                    tiny_models["neox"],
                    run_dir,
                    *common,
                    f"trainer.per_device_train_batch_size={batch}",
                    f"trainer.gradient_accumulation_steps={accumulation}",
                ),
            )
        )
        results.append(load_file(str(run_dir / "adapter" / "adapter_model.safetensors")))
    first, second = results
    assert max((first[k] - second[k]).abs().max().item() for k in first) <= 1e-6
    assert any(v.abs().sum() > 0 for k, v in first.items() if "lora_B" in k)
