"""Fingerprints of what a run trains on, so a resume (and later a merge) can tell "same" from "different".

- base model: sha256 over config.json, each safetensors shard's header (names, dtypes, shapes) and 64 KiB of
  tensor data at the start and end of every shard. Cheap (no full read of a 40 GB model), and it separates two
  checkpoints of the same shape (a fine-tune of the base) that a header-only hash would call equal.
- data: sha256 over the exact token ids and labels that train and evaluate (template, tokenizer and length policy
  included, because they change the ids).
- run facts: the settings whose change makes a resumed run a different run (see RESUME_FIELDS).
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

SAMPLE_BYTES = 64 * 1024

# fields compared on resume; a change is refused unless named in resume_allow_drift
RESUME_FIELDS = ("base_model", "dataset", "strategy", "seed", "per_device_train_batch_size", "gradient_accumulation_steps",
                 "world_size", "max_length", "packing", "dtype", "learning_rate", "lr_scheduler_type", "max_steps",
                 "num_train_epochs", "weight_decay", "warmup_steps")


def model_files(model_cfg) -> Path | None:
    """The local folder holding the base's config.json and weights (a local path or the Hub cache)."""
    path = Path(model_cfg.name_or_path).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(model_cfg.name_or_path, "config.json", revision=model_cfg.revision)
    return Path(config).parent if isinstance(config, str) else None


def base_model(folder: Path) -> str:
    digest = hashlib.sha256()
    digest.update((folder / "config.json").read_bytes())
    for shard in sorted(folder.glob("*.safetensors")):
        with shard.open("rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            digest.update(f.read(header_len))
            digest.update(f.read(SAMPLE_BYTES))
            size = shard.stat().st_size
            f.seek(max(8 + header_len, size - SAMPLE_BYTES))
            digest.update(f.read(SAMPLE_BYTES))
    return digest.hexdigest()


def config_sha256(folder: Path) -> str:
    return hashlib.sha256((folder / "config.json").read_bytes()).hexdigest()


def base_record(model_cfg, folder: Path | None, hub_id: str | None, weights: str | None, quantization: dict | None = None) -> dict:
    """What an adapter records about its base (base_model.json): merge refuses any other base, and compares a merge of
    a QLoRA adapter with the 4-bit model it trained (`quantization`: the BitsAndBytesConfig kwargs, else None)."""
    return {
        "hub_id": hub_id,
        "name_or_path": hub_id or (Path(model_cfg.name_or_path).name if folder else model_cfg.name_or_path),
        "revision": model_cfg.revision,
        "family": model_cfg.family,
        "training_dtype": model_cfg.dtype,
        "config_sha256": config_sha256(folder) if folder else None,
        "weights_fingerprint": weights if folder else None,
        "quantization": quantization,
    }


def base_mismatch(recorded: dict, folder: Path) -> list[str]:
    """How the base in `folder` differs from the recorded one (empty when it is the same checkpoint)."""
    lines = []
    for key, label, compute in (("config_sha256", "config.json sha256", config_sha256), ("weights_fingerprint", "weights fingerprint", base_model)):
        if recorded.get(key) and recorded[key] != (here := compute(folder)):
            lines.append(f"{label} {recorded[key][:16]}... at training, {here[:16]}... here")
    return lines


def dataset(samples: list, packed: bool) -> str:
    digest = hashlib.sha256(b"packed" if packed else b"unpacked")
    for sample in samples:
        digest.update(json.dumps([sample.input_ids, sample.labels]).encode())
    return digest.hexdigest()


def run_facts(cfg, strategy: dict, base: str, data: str, world_size: int) -> dict:
    """What must not change between a checkpoint and the run that resumes it."""
    trainer = cfg.trainer
    facts = {"base_model": base, "dataset": data, "strategy": strategy, "seed": cfg.seed, "world_size": world_size,
             "max_length": cfg.data.max_length, "packing": cfg.data.packing, "dtype": cfg.model.dtype}
    for key in RESUME_FIELDS:
        if key not in facts:
            facts[key] = trainer.get(key)
    return json.loads(json.dumps(facts, default=str))


def drift(saved: dict, current: dict, allowed: list[str]) -> list[str]:
    """One line per changed value that is not allowed: `field[.key]: checkpoint value -> this run's value`."""
    lines = []
    for key in RESUME_FIELDS:
        if key in allowed or saved.get(key) == current.get(key):
            continue
        old, new = saved.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):  # name the sub-keys that changed (strategy.r, ...)
            lines += [f"{key}.{sub}: {_short(old.get(sub))} in the checkpoint -> {_short(new.get(sub))} now"
                      for sub in sorted(set(old) | set(new)) if old.get(sub) != new.get(sub)]
        else:
            lines.append(f"{key}: {_short(old)} in the checkpoint -> {_short(new)} now")
    return lines


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 80 else text[:77] + "..."
