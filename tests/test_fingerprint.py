"""The base fingerprint: every byte of every weights file counts (a full sha256, cached per file), and old-format
records from earlier runs are still compared, with a warning that they do not cover the whole file."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_merge import random_adapter, run_merge

from finetune.errors import IntegrityError
from finetune.inference import generate
from finetune.models import fingerprint

MIDDLE_ATTENTION = [
    f"gpt_neox.layers.{n}.attention.{m}.weight"
    for n, m in ((1, "query_key_value"), (1, "dense"), (2, "query_key_value"))
]


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(fingerprint.CACHE_VARIABLE, str(tmp_path / "fingerprint-cache.json"))


def altered_copy(base: Path, out: Path, change) -> Path:
    """A copy of `base` whose model.safetensors went through `change` (same names, dtypes, shapes: same header)."""
    shutil.copytree(base, out)
    tensors = load_file(out / "model.safetensors")
    change(tensors)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def scale_middle_attention(tensors: dict) -> None:
    for name in MIDDLE_ATTENTION:  # the reviewer's base: three attention matrices in the middle scaled by 1.5
        tensors[name] = tensors[name] * 1.5


def test_base_differing_in_the_middle_refused_by_merge_and_generate(tiny_models, tmp_path):
    base = tiny_models["neox"]
    adapter = random_adapter(base, tmp_path / "adapter", "neox")
    other = altered_copy(base, tmp_path / "other", scale_middle_attention)
    header = (base / "model.safetensors").read_bytes()[:4096]
    # the header (and both ends) do not tell them apart
    assert (other / "model.safetensors").read_bytes()[:4096] == header

    with pytest.raises(IntegrityError, match="weights fingerprint") as err:
        run_merge(adapter, other, tmp_path / "merged")
    assert str(other) in str(err.value) and not (tmp_path / "merged").exists()
    with pytest.raises(IntegrityError, match="weights fingerprint"):
        generate.plan(adapter, base=str(other))  # evaluate plans its loading through generate.plan too
    assert generate.plan(adapter, base=str(base)).weights == base


def test_one_element_anywhere_changes_the_fingerprint(tiny_models, tmp_path):
    """The bound: a change of a single element (here one fp32 value mid-tensor, mid-file) is seen."""
    base = tiny_models["neox"]
    record = {"weights_fingerprint": fingerprint.base_model(base)}

    def one_element(tensors):
        tensors["gpt_neox.layers.2.mlp.dense_h_to_4h.weight"][256, 64] += 1e-6

    other = altered_copy(base, tmp_path / "other", one_element)
    assert fingerprint.base_mismatch(record, base) == []
    assert fingerprint.base_mismatch(record, other)[0].startswith("weights fingerprint")


def test_each_file_hashed_once_then_cached_by_path_size_mtime_inode(tiny_models, tmp_path):
    base = shutil.copytree(tiny_models["neox"], tmp_path / "base")
    weights = base / "model.safetensors"
    first = fingerprint.base_model(base)
    cache = json.loads(Path(os.environ[fingerprint.CACHE_VARIABLE]).read_text())
    assert cache[str(weights.resolve())]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()

    cache[str(weights.resolve())]["sha256"] = "0" * 64  # an entry whose file is unchanged is trusted, not re-read
    Path(os.environ[fingerprint.CACHE_VARIABLE]).write_text(json.dumps(cache))
    assert fingerprint.base_model(base) != first

    tensors = load_file(weights)
    save_file(tensors, weights, metadata={"format": "pt"})  # rewritten: a new mtime (and inode) makes it hash again
    assert fingerprint.base_model(base) == first


def test_old_format_record_compared_the_old_way_with_a_warning(tiny_models, tmp_path):
    base = tiny_models["neox"]
    old = {"weights_fingerprint": fingerprint.sampled(base)}
    assert ":" not in old["weights_fingerprint"]
    warnings = []
    assert fingerprint.base_mismatch(old, base, warn=warnings.append) == []
    assert "older format" in warnings[0] and "64 KiB" in warnings[0]

    def everything(tensors):
        for name in tensors:
            tensors[name] = tensors[name] + 0.01

    changed = altered_copy(base, tmp_path / "changed", everything)
    assert "older format" in fingerprint.base_mismatch(old, changed)[0]
    assert fingerprint.base_mismatch({"weights_fingerprint": "sha256-v9:abc"}, base)[0].startswith(
        "weights fingerprint"
    )


def test_one_element_within_a_tensor_bound(tiny_models, tmp_path):
    """Weights stored as bf16 too: flipping the lowest mantissa bit of one value in the middle is seen."""
    base = tiny_models["neox"]

    def to_bf16(tensors):
        for name in tensors:
            tensors[name] = tensors[name].to(torch.bfloat16)

    bf16 = altered_copy(base, tmp_path / "bf16", to_bf16)
    record = {"weights_fingerprint": fingerprint.base_model(bf16)}

    def flip_one_bit(tensors):
        tensor = tensors["gpt_neox.layers.1.attention.query_key_value.weight"]
        tensor.view(torch.int16)[190, 64] ^= 1

    flipped = altered_copy(bf16, tmp_path / "flipped", flip_one_bit)
    assert fingerprint.base_mismatch(record, flipped)
