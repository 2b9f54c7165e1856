"""Distributed training through the real engines, for real, on CPU: 2 processes, gloo (DeepSpeed: its CPU accelerator).

One LoRA configuration on tiny NeoX in fp32, trained five ways with the same global batch of 8 and the same data order
(accelerate's seedable sampler deals each global batch out across the ranks):
  single process  per_device_train_batch_size=4, gradient_accumulation_steps=2
  DDP / ZeRO-2 / ZeRO-3 / FSDP2, 2 processes  per_device_train_batch_size=2, gradient_accumulation_steps=2
Each is launched as a user launches it: `accelerate launch --config_file conf/accelerate/ddp.yaml --num_processes 2
-m finetune ...`. The adapters agree within ADAPTER_TOLERANCE (max abs difference, fp32). They are not bitwise equal:
batches of 2 instead of 4 pad to other lengths and reduce in another order (measured on an Intel Xeon: 4.7e-6 DDP,
5.0e-6 ZeRO-2 and ZeRO-3; on an AMD EPYC with AVX512-BF16, transformers 5.25: 1.56e-5 DDP and FSDP, 1.47e-5 ZeRO-2
and ZeRO-3, the landed code of 2026-11-21 included; against weights up to 0.095). The before-training eval runs in all
of them: calling it the transformers
way (evaluate() before train()) once made DDP ranks train apart without a word, 0.039 off.

Every launch costs ~20 s of startup (two interpreters, torch, DeepSpeed), so each run is made once (module fixtures)
and read by several tests. DeepSpeed JIT-compiles its small shared-memory comm op the first time on a machine
(~1.5 min, cached in ~/.cache/torch_extensions).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from finetune.runs import checkpoints

from helpers import PROJECT, tiny_overrides

ADAPTER_TOLERANCE = 5e-5  # max abs difference of any adapter weight vs the single-process run (fp32); a rank that
# trains apart (gradients not averaged) is 0.039 off: three orders of magnitude above
LAUNCH = [
    sys.executable,
    "-m",
    "accelerate.commands.launch",
    "--config_file",
    str(PROJECT / "conf/accelerate/ddp.yaml"),
    "--num_processes",
    "2",
    "--main_process_port",
    "0",
    "-m",
    "finetune",
]
CPU_ENV = {
    "CUDA_VISIBLE_DEVICES": "",  # CPU and gloo even where GPUs exist: the comparison is about the engines, not devices
    "DS_ACCELERATOR": "cpu",  # DeepSpeed's CPU accelerator (it also picks it by itself when torch has no CUDA)
    "OMP_NUM_THREADS": "1",  # two processes on two cores
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
needs_deepspeed = pytest.mark.skipif(
    not HAS_DEEPSPEED, reason='DeepSpeed is not installed (pip install -e ".[deepspeed]")'
)


def _overrides(model_dir: Path, output_dir: Path, per_device: int, *extra: str) -> list[str]:
    return tiny_overrides(
        "neox",
        model_dir,
        output_dir,
        "trainer.max_steps=4",
        "trainer.logging_steps=1",
        "trainer.bf16=false",
        "trainer.dataloader_num_workers=0",
        "strategy.lora_dropout=0.0",  # dropout draws differ per rank
        f"trainer.per_device_train_batch_size={per_device}",
        "trainer.gradient_accumulation_steps=2",
        *extra,
    )


def _launch(model_dir: Path, output_dir: Path, *extra: str, timeout: int = 300) -> subprocess.CompletedProcess:
    started = time.perf_counter()
    result = subprocess.run(
        [*LAUNCH, *_overrides(model_dir, output_dir, 2, *extra)],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **CPU_ENV},
        check=False,
    )
    result.seconds = time.perf_counter() - started
    return result


def _launched(model_dir: Path, output_dir: Path, *extra: str) -> Path:
    result = _launch(model_dir, output_dir, *extra)
    assert result.returncode == 0, result.stderr[-4000:]
    (output_dir / "launch_stderr.txt").write_text(result.stderr, encoding="utf-8")  # for the rank checks below
    return output_dir


def _adapter(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def _max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _run_json(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text(encoding="utf-8"))


def _history(run_dir: Path) -> list[dict]:
    history = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))["history"]
    return [h for h in history if "loss" in h and "grad_norm" in h]


@pytest.fixture(scope="module")
def single(tiny_models, tmp_path_factory) -> Path:
    """The reference: one process, in this interpreter, batch 4 x accumulation 2."""
    from finetune.config.compose import compose
    from finetune.train.run import run

    return run(compose("demo", _overrides(tiny_models["neox"], tmp_path_factory.mktemp("single") / "run", 4)))


@pytest.fixture(scope="module")
def ddp(tiny_models, tmp_path_factory) -> Path:
    return _launched(tiny_models["neox"], tmp_path_factory.mktemp("ddp") / "run", "distributed=ddp")


@pytest.fixture(scope="module")
def zero2(tiny_models, tmp_path_factory) -> Path:
    return _launched(tiny_models["neox"], tmp_path_factory.mktemp("zero2") / "run", "distributed=zero2")


@pytest.fixture(scope="module")
def fsdp(tiny_models, tmp_path_factory) -> Path:
    """FSDP2 on CPU processes: accelerate leaves it out there; finetune.fsdp turns it on."""
    return _launched(tiny_models["neox"], tmp_path_factory.mktemp("fsdp") / "run", "distributed=fsdp")


ZERO3_SAVES = ("trainer.save_strategy=steps", "trainer.save_steps=2")


@pytest.fixture(scope="module")
def zero3(tiny_models, tmp_path_factory) -> Path:
    """ZeRO-3, committing checkpoints at steps 2 and 4 (the resume test starts from the one at step 2)."""
    return _launched(tiny_models["neox"], tmp_path_factory.mktemp("zero3") / "run", "distributed=zero3", *ZERO3_SAVES)


@pytest.mark.slow
@pytest.mark.parametrize(
    "engine",
    ["ddp", pytest.param("zero2", marks=needs_deepspeed), pytest.param("zero3", marks=needs_deepspeed), "fsdp"],
)
def test_two_processes_train_the_same_adapter_as_one(engine, single, request):
    run_dir = request.getfixturevalue(engine)
    reference, adapter = _adapter(single), _adapter(run_dir)
    assert {k: v.shape for k, v in adapter.items()} == {k: v.shape for k, v in reference.items()}  # whole, not shards
    assert all(v.numel() > 0 for v in adapter.values())
    diff = _max_abs_diff(reference, adapter)
    print(f"{engine}: max abs adapter difference vs single process {diff:.2e}")
    assert diff <= ADAPTER_TOLERANCE, f"{engine}: adapter differs from the single-process run by {diff:.2e}"
    # the same global batches, step by step: loss and gradient norm of every optimizer step
    steps, reference_steps = _history(run_dir), _history(single)
    assert [h["step"] for h in steps] == [h["step"] for h in reference_steps] == [1, 2, 3, 4]
    for mine, theirs in zip(steps, reference_steps):
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-5), mine["step"]
        assert mine["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-4), mine["step"]
    record, reference_record = _run_json(run_dir), _run_json(single)
    assert record["status"] == "completed" and record["global_steps"] == 4
    # really sharded, not the DDP accelerate falls back to on CPU (adapters would match either way)
    if engine == "fsdp":
        assert record["fsdp_sharded_parameters"] > 0
    # the untouched base
    assert record["eval_loss_before"] == pytest.approx(reference_record["eval_loss_before"], abs=1e-5)
    assert record["eval_loss_after"] == pytest.approx(reference_record["eval_loss_after"], abs=1e-4)
    samples = json.loads((run_dir / "samples.json").read_text(encoding="utf-8"))["samples"]
    reference_samples = json.loads((single / "samples.json").read_text(encoding="utf-8"))["samples"]
    assert [s["before"] for s in samples] == [s["before"] for s in reference_samples]


@pytest.mark.slow
@needs_deepspeed
def test_zero3_saves_a_complete_adapter_that_peft_loads(zero3, single, tiny_models):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[5, 17, 42, 99, 7, 300, 12, 64]])
    logits = {}
    for name, run_dir in (("single", single), ("zero3", zero3)):
        base = AutoModelForCausalLM.from_pretrained(tiny_models["neox"], dtype=torch.float32)
        model = PeftModel.from_pretrained(base, run_dir / "adapter").eval()
        with torch.no_grad():
            logits[name] = model(ids).logits
    assert (logits["single"] - logits["zero3"]).abs().max().item() < 1e-4
    config = json.loads((zero3 / "adapter" / "adapter_config.json").read_text(encoding="utf-8"))
    assert config["r"] == 16 and str(tiny_models["neox"]) not in json.dumps(config)  # local path scrubbed as ever
    # committed by rank 0 after every rank wrote its shard
    for checkpoint in checkpoints.candidates(zero3 / "checkpoints"):
        assert checkpoints.verify(checkpoint) is None
        shards = sorted(p.name for p in (checkpoint / f"global_step{checkpoints.step_of(checkpoint)}").iterdir())
        assert shards == [
            f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt" for r in (0, 1) for kind in ("model", "optim")
        ]


@pytest.mark.slow
@needs_deepspeed
def test_zero3_resume_continues_exactly(zero3, tiny_models, tmp_path):
    """The state a crash after step 3 leaves (run.json still "running", checkpoint-4 torn), then resume=true."""
    crashed = tmp_path / "run"
    shutil.copytree(zero3, crashed)
    shutil.rmtree(crashed / "adapter")
    # torn: rank 0 sets it aside, rank 1 skips it
    (crashed / "checkpoints" / "checkpoint-4" / checkpoints.MANIFEST).unlink()
    record = _run_json(crashed)
    record.update(status="running", exit_code=None)
    (crashed / "run.json").write_text(json.dumps(record), encoding="utf-8")

    _launched(tiny_models["neox"], crashed, "distributed=zero3", *ZERO3_SAVES, "resume=true")
    resumed = _run_json(crashed)
    assert resumed["status"] == "completed" and resumed["resumed_from"] == "checkpoint-2"
    assert [a["status"] for a in resumed["previous_attempts"]] == ["running"]
    assert [p.name for p in (crashed / "checkpoints" / checkpoints.QUARANTINE).glob("checkpoint-4-*") if p.is_dir()]
    diff = _max_abs_diff(_adapter(zero3), _adapter(crashed))
    print(f"zero3 resumed from step 2 vs uninterrupted: max abs adapter difference {diff:.2e}")
    assert diff <= 1e-6

    def steps(run_dir: Path) -> list[dict]:
        return [json.loads(line) for line in (run_dir / "train_steps.jsonl").read_text(encoding="utf-8").splitlines()]

    assert steps(crashed) == steps(zero3)  # same batches and losses at every step, replayed ones included


@pytest.mark.slow
def test_only_rank_zero_writes_the_run_directory(ddp, single):
    # the same files as a single-process run, each written once: no per-rank copies, no torn temporary files; the log
    # holds rank 0's lines alone
    written = sorted(p.name for p in ddp.iterdir() if p.name != "launch_stderr.txt")
    assert written == sorted(p.name for p in single.iterdir()) and "train.log" in written
    assert (ddp / "train.log").read_text(encoding="utf-8").count("[finetune] run directory: ") == 1
    assert not [p for p in ddp.rglob(".*.tmp")]
    record = _run_json(ddp)
    assert record["status"] == "completed" and record["exit_code"] == 0
    # one line per step, not per rank
    assert len((ddp / "train_steps.jsonl").read_text(encoding="utf-8").splitlines()) == 4
    stderr = (ddp / "launch_stderr.txt").read_text(encoding="utf-8")
    assert stderr.count("[finetune] run directory:") == 1  # our messages come from rank 0 alone
    assert "error" not in (ddp / "train.log").read_text(encoding="utf-8").lower()


@pytest.mark.slow
def test_a_config_error_on_one_rank_stops_the_launch(tiny_models, tmp_path):
    """Rank 1 cannot read its data file; rank 0 can and goes on to wait for rank 1 in the process group. The launcher
    stops rank 0 at once (it keeps the default SIGTERM action until the group exists), instead of rank 0 ignoring the
    SIGTERM and being killed 30 s later (measured before: 45 s in all)."""
    shutil.copyfile(PROJECT / "finetune/demo_data/legal_medical_qa.jsonl", tmp_path / "rows_0.jsonl")
    result = _launch(
        tiny_models["neox"],
        tmp_path / "run",
        "distributed=ddp",
        f"data.path={tmp_path}/rows_${{oc.env:RANK}}.jsonl",
        timeout=120,
    )
    assert result.returncode != 0
    assert "rows_1.jsonl" in result.stderr and "data.path" in result.stderr
    assert "Unable to shutdown process" not in result.stderr  # torchrun's words before it escalates to SIGKILL
    assert result.seconds < 90, f"the launch took {result.seconds:.0f} s to stop"


def test_distributed_options_compose_and_validate(tmp_path):
    """Every conf/distributed option composes and validates (FSDP too: finetune.fsdp enables it on CPU)."""
    from finetune.config.compose import compose, group_options
    from finetune.config.validate import validate
    from finetune.errors import ConfigError

    assert set(group_options("distributed")) >= {"none", "ddp", "zero2", "zero3", "zero3_offload", "fsdp"}
    for option in group_options("distributed"):
        cfg = compose("demo", [f"distributed={option}", f"output_dir={tmp_path / option}"])
        if cfg.distributed.backend == "deepspeed" and not HAS_DEEPSPEED:
            continue
        _, warnings = validate(cfg)
        assert (option in ("ddp", "fsdp")) == any("single process" in w for w in warnings)
    offload = compose("demo", ["distributed=zero3_offload"]).distributed.deepspeed.zero_optimization
    assert offload.offload_optimizer.device == offload.offload_param.device == "cpu"
    assert offload.offload_param.pin_memory is True
    with pytest.raises(ConfigError, match="distributed.backend: 'horovod' is not one of none, ddp, deepspeed, fsdp"):
        validate(compose("demo", ["distributed.backend=horovod", f"output_dir={tmp_path / 'x'}"]))
    with pytest.raises(ConfigError, match="trainer.fsdp: set through distributed=fsdp"):
        validate(compose("demo", ["++trainer.fsdp=true", f"output_dir={tmp_path / 'y'}"]))


# the reference is the base with the adapter switched off, on every rank; the DPO demo's rate (at SFT's 1e-2 the
# margin saturates within 4 steps and the padding-order differences grow to 2e-4)
DPO = ("objective=dpo", "data=demo_prefs", "trainer.learning_rate=2e-3")


@pytest.fixture(scope="module")
def dpo_single(tiny_models, tmp_path_factory) -> Path:
    from finetune.config.compose import compose
    from finetune.train.run import run

    return run(compose("demo", _overrides(tiny_models["neox"], tmp_path_factory.mktemp("dpo_single") / "run", 4, *DPO)))


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", pytest.param("zero3", marks=needs_deepspeed)])
def test_dpo_on_two_processes_trains_the_same_adapter_as_one(engine, dpo_single, tiny_models, tmp_path):
    run_dir = _launched(tiny_models["neox"], tmp_path / "run", f"distributed={engine}", *DPO)
    diff = _max_abs_diff(_adapter(dpo_single), _adapter(run_dir))
    print(f"DPO {engine}: max abs adapter difference vs single process {diff:.2e}")
    assert diff <= ADAPTER_TOLERANCE
    steps, reference_steps = _history(run_dir), _history(dpo_single)
    assert [h["step"] for h in steps] == [h["step"] for h in reference_steps] == [1, 2, 3, 4]
    for mine, theirs in zip(steps, reference_steps):
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-5), mine["step"]
        assert mine["rewards/margins"] == pytest.approx(theirs["rewards/margins"], rel=1e-4, abs=1e-6), mine["step"]
    preference = _run_json(run_dir)["preference_eval"]["metrics"]
    assert preference["reward margin"]["before"] == pytest.approx(0.0, abs=1e-6)  # measured in the loop, policy = ref
    assert preference["reward margin"]["after"] == pytest.approx(
        _run_json(dpo_single)["preference_eval"]["metrics"]["reward margin"]["after"], rel=1e-4
    )
