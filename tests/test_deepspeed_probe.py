"""finetune.train.deepspeed_probe: accelerate's "is this a DeepSpeedEngine?" no longer imports deepspeed (1.2 s) in a
process that never loaded it, and still recognises an engine once deepspeed is loaded. Each case runs in a fresh
interpreter, since the test session itself may have imported deepspeed already."""

from __future__ import annotations

import subprocess
import sys

import pytest

UNWRAP = """
import sys, torch
{patch}
from accelerate.utils import extract_model_from_parallel
model = torch.nn.Linear(2, 2)
assert extract_model_from_parallel(model) is model
print("deepspeed" in sys.modules)
"""
PATCH = "from finetune.train import deepspeed_probe; deepspeed_probe.answer_without_importing()"


@pytest.mark.parametrize("patched", [False, True])
def test_unwrapping_a_model_imports_deepspeed_only_without_the_probe(patched):
    pytest.importorskip("deepspeed")
    code = UNWRAP.format(patch=PATCH if patched else "")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[-1] == ("False" if patched else "True")


def test_a_loaded_deepspeed_is_still_asked():
    pytest.importorskip("deepspeed")
    code = f"""
import deepspeed
{PATCH}
import accelerate.utils.other as other
assert other.is_deepspeed_available() is True
{PATCH}  # twice: one wrapper
assert getattr(other.is_deepspeed_available, "_finetune_probe", False)
assert other.is_deepspeed_available.__closure__[0].cell_contents.__module__.startswith("accelerate")
print("ok")
"""
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()[-1]
        == "ok"
    )
