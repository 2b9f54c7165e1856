"""Weights files we read or stage are validated in full, and the Hub cache layout is accepted
(issue 20 items 4, 7; RELIABILITY_PLAN SE-04, 7.x "a header whose shape disagrees with its byte span")."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from finetune.errors import IntegrityError
from finetune.models import shards


def _write(path: Path, header: dict, data: bytes) -> Path:
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)
    return path


def test_a_shape_that_disagrees_with_its_byte_span_is_refused(tmp_path):
    # offsets contiguous and inside the file, but 2x3 float32 needs 24 bytes, not 16
    path = _write(
        tmp_path / "w.safetensors", {"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 16]}}, bytes(16)
    )
    with pytest.raises(
        IntegrityError, match=r"w.safetensors: tensor w is F32 \[2, 3\] \(24 bytes\) but spans 16 bytes"
    ):
        shards.ShardReader(path)


def test_trailing_bytes_after_the_last_tensor_are_refused(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"w": torch.ones(2, 2)}, str(path))
    with path.open("ab") as f:
        f.write(b"\0" * 8)
    with pytest.raises(IntegrityError, match=r"w.safetensors: 8 bytes after the last tensor"):
        shards.ShardReader(path)


def test_negative_or_non_integer_shapes_are_refused(tmp_path):
    path = _write(
        tmp_path / "w.safetensors", {"w": {"dtype": "F32", "shape": [-1, 4], "data_offsets": [0, 16]}}, bytes(16)
    )
    with pytest.raises(IntegrityError, match=r"tensor w has shape \[-1, 4\]"):
        shards.ShardReader(path)


def test_a_valid_file_still_reads(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(
        {"a": torch.arange(6.0).reshape(2, 3), "b": torch.zeros(0), "c": torch.ones(3, dtype=torch.bfloat16)}, str(path)
    )
    with shards.ShardReader(path) as reader:
        assert torch.equal(reader.read("a"), torch.arange(6.0).reshape(2, 3))


def _hub_cache_snapshot(root: Path) -> Path:
    """The layout huggingface_hub writes: snapshots/<rev>/<file> -> ../../blobs/<hash>."""
    repo = root / "models--org--model"
    blobs, snapshot = repo / "blobs", repo / "snapshots" / "abc123"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for name, tensors in (
        ("model-00001-of-00002.safetensors", {"a": torch.ones(2)}),
        ("model-00002-of-00002.safetensors", {"b": torch.zeros(2)}),
    ):
        save_file(tensors, str(blobs / f"blob-{name[6:11]}"))
        os.symlink(f"../../blobs/blob-{name[6:11]}", snapshot / name)
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (blobs / "blob-index").write_text(json.dumps(index))
    os.symlink("../../blobs/blob-index", snapshot / shards.SAFETENSORS_INDEX)
    return snapshot


def test_a_sharded_base_in_the_hub_cache_is_accepted(tmp_path):
    snapshot = _hub_cache_snapshot(tmp_path)
    assert [p.name for p in shards.weight_files(snapshot)] == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]


def test_a_hub_cache_link_that_leaves_the_repository_is_refused(tmp_path):
    snapshot = _hub_cache_snapshot(tmp_path)
    outside = tmp_path / "elsewhere.safetensors"
    save_file({"b": torch.zeros(2)}, str(outside))
    (snapshot / "model-00002-of-00002.safetensors").unlink()
    os.symlink(outside, snapshot / "model-00002-of-00002.safetensors")
    with pytest.raises(IntegrityError, match="lies outside the model folder"):
        shards.weight_files(snapshot)


def test_a_link_into_another_repositorys_blobs_is_refused(tmp_path):
    snapshot = _hub_cache_snapshot(tmp_path)
    other = _hub_cache_snapshot(tmp_path / "other")
    (snapshot / "model-00002-of-00002.safetensors").unlink()
    os.symlink(other.parents[1] / "blobs" / "blob-00002", snapshot / "model-00002-of-00002.safetensors")
    with pytest.raises(IntegrityError, match="lies outside the model folder"):
        shards.weight_files(snapshot)


def test_an_index_entry_that_climbs_out_is_still_refused(tmp_path):
    snapshot = _hub_cache_snapshot(tmp_path)
    (snapshot / shards.SAFETENSORS_INDEX).unlink()
    (snapshot / shards.SAFETENSORS_INDEX).write_text(json.dumps({"weight_map": {"a": "../../blobs/blob-00001"}}))
    with pytest.raises(IntegrityError, match="lies outside the model folder"):
        shards.weight_files(snapshot)


def test_disk_full_without_an_errno_is_recognised_by_the_free_space(tiny_models, tmp_path, monkeypatch):
    """A real full disk inside torch.save raises RuntimeError('basic_ios::clear: iostream error'), no errno, no
    'No space left' (item 8): the free space at the failure decides."""
    import shutil
    from collections import namedtuple

    from finetune.config.compose import compose
    from finetune.errors import EXIT_FAILURE, DiskFullError
    from finetune.runs import checkpoints
    from finetune.train.run import run

    from harness import overrides

    run_dir, real_save, real_usage, full = tmp_path / "run", torch.save, shutil.disk_usage, []
    usage = namedtuple("usage", "total used free")

    def full_disk_save(obj, path, *args, **kwargs):
        if str(path).endswith("checkpoint-6/optimizer.pt"):
            full.append(path)
            raise RuntimeError(
                "[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0; basic_ios::clear: iostream error"
            )
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk_save)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 4096, 4096) if full else real_usage(p))
    with pytest.raises(DiskFullError) as caught:
        run(compose("demo", overrides(tiny_models["neox"], run_dir)))
    message = str(caught.value)
    assert (
        f"no space left on the device of {run_dir / 'checkpoints'} while saving checkpoint-6 (0.0 MiB free" in message
    )
    assert "a checkpoint needs about" in message and "checkpoint-3 is intact" in message
    assert "basic_ios::clear" in message  # what torch said, for the record
    assert [c.name for c in checkpoints.candidates(run_dir / "checkpoints")] == ["checkpoint-3"]
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "failed:disk_full" and record["exit_code"] == EXIT_FAILURE


def test_a_save_error_with_room_to_spare_is_not_called_disk_full(tiny_models, tmp_path, monkeypatch):
    from finetune.config.compose import compose
    from finetune.train.run import run

    from harness import overrides

    real_save = torch.save

    def failing_save(obj, path, *args, **kwargs):
        if str(path).endswith("checkpoint-3/optimizer.pt"):
            raise RuntimeError("basic_ios::clear: iostream error")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(RuntimeError, match="basic_ios::clear"):
        run(compose("demo", overrides(tiny_models["neox"], tmp_path / "run", "trainer.max_steps=3")))


def _adapter_on(base: Path, out: Path) -> Path:
    """A peft LoRA adapter saved over a tiny base (random B, so merging changes weights)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
        LoraConfig(r=4, lora_alpha=8, target_modules=["query_key_value"], task_type="CAUSAL_LM"),
    )
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out


@pytest.mark.parametrize("error", ["enospc", "iostream"])
def test_merge_onto_a_full_disk_is_disk_full_and_leaves_no_partial(tiny_models, tmp_path, monkeypatch, error):
    import errno
    import shutil
    from collections import namedtuple

    from finetune import console as cli
    from finetune.adapters import merge
    from finetune.errors import DiskFullError

    adapter = _adapter_on(tiny_models["neox"], tmp_path / "adapter")
    out, real_usage, full = tmp_path / "merged", shutil.disk_usage, []
    usage = namedtuple("usage", "total used free")

    def full_disk_write(self, name, tensor):
        full.append(name)
        if error == "enospc":
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
        raise RuntimeError("basic_ios::clear: iostream error")

    monkeypatch.setattr(shards.ShardWriter, "write", full_disk_write)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 4096, 4096) if full else real_usage(p))
    with pytest.raises(DiskFullError) as caught:
        merge.run(
            cli.parse(
                [str(adapter), f"base={tiny_models['neox']}", f"out={out}", "dtype=float32"], merge.OPTIONS, "target"
            )
        )
    assert (
        f"no space left on the device of {tmp_path} while merging into {out} (0.0 MiB free; the merged model needs "
        "about" in str(caught.value)
    )
    assert caught.value.reason == "disk_full"
    assert not out.exists() and not out.with_name("merged.partial").exists()


@pytest.mark.parametrize("value", [-1.8e37, float("nan")])
def test_merge_refuses_a_non_finite_or_absurd_adapter_weight(tiny_models, tmp_path, value):
    """One flipped exponent bit made a LoRA weight -1.8e37 (item 3): the gate compared against the same adapter and
    passed."""
    from safetensors.torch import load_file

    from finetune import console as cli
    from finetune.adapters import merge

    adapter = _adapter_on(tiny_models["neox"], tmp_path / "adapter")
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    name = sorted(n for n in tensors if "lora_A" in n)[0]
    tensors[name][0, 0] = value
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(IntegrityError, match=rf"adapter_model.safetensors: tensor {name} holds .*(nan|-1.8e\+37)"):
        merge.run(
            cli.parse(
                [str(adapter), f"base={tiny_models['neox']}", f"out={tmp_path / 'merged'}", "dtype=float32"],
                merge.OPTIONS,
                "target",
            )
        )
    assert not (tmp_path / "merged").exists() and not (tmp_path / "merged.partial").exists()
