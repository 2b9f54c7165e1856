"""finetune.precision: `auto` becomes bf16 only where the hardware computes it natively, never fp16."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from finetune.config import precision
from finetune.config.compose import compose
from finetune.plan import planning as plan

XEON_NO_BF16 = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512bw avx512_vnni\n"
EPYC_BF16 = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 avx512_vnni\n"
GRAVITON3 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"


@pytest.mark.parametrize(
    ("cpuinfo", "bf16"), [(XEON_NO_BF16, False), (EPYC_BF16, True), (GRAVITON3, True), ("", False)]
)
def test_cpu_choice_follows_the_native_bf16_flags(tmp_path, cpuinfo, bf16):
    path = tmp_path / "cpuinfo"
    path.write_text(cpuinfo)
    chosen, why = precision.choose(cuda=False, flags=precision.cpu_flags(path))
    assert chosen is bf16
    assert why.startswith("bf16" if bf16 else "fp32")


def test_unreadable_cpuinfo_means_fp32(tmp_path):
    assert precision.cpu_flags(tmp_path / "missing") == set()
    assert precision.choose(cuda=False, flags=set())[0] is False


@pytest.mark.parametrize("bf16", [True, False])
def test_resolve_replaces_auto_and_keeps_explicit_settings(bf16):
    resolved = OmegaConf.to_container(compose("lora_neox20b"), resolve=True)
    assert resolved["model"]["dtype"] == "auto" and resolved["trainer"]["bf16"] == "auto"
    assert precision.resolve(resolved, bf16)
    assert resolved["model"]["dtype"] == ("bfloat16" if bf16 else "float32") and resolved["trainer"]["bf16"] is bf16
    explicit = OmegaConf.to_container(
        compose("lora_neox20b", ["model.dtype=float32", "trainer.bf16=true"]), resolve=True
    )
    assert not precision.resolve(explicit, bf16=False)
    assert explicit["model"]["dtype"] == "float32" and explicit["trainer"]["bf16"] is True


def test_auto_with_fp16_requested_never_adds_bf16():
    resolved = OmegaConf.to_container(compose("lora_neox20b", ["+trainer.fp16=true", "allow_fp16=true"]), resolve=True)
    precision.resolve(resolved, bf16=True)
    assert resolved["trainer"]["bf16"] is False and resolved["model"]["dtype"] == "float32"
    assert "fp16 autocast with loss scaling" in precision.describe(resolved)


def test_planner_resolves_auto_for_the_target_gpu():
    on_h100 = plan.plan(compose("lora_neox20b"), gpu="h100-80gb", suggest=False)
    on_t4 = plan.plan(compose("lora_neox20b"), gpu="t4-16gb", suggest=False)
    assert any("precision auto" in n and "bfloat16" in n and "bf16 autocast" in n for n in on_h100.notes)
    assert any("precision auto" in n and "float32" in n and "no autocast" in n for n in on_t4.notes)
    assert on_t4.total_bytes > on_h100.total_bytes  # fp32 weights take twice the memory
