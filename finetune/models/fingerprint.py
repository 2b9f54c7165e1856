"""Fingerprints of what a run trains on, so a resume (and later a merge) can tell "same" from "different".

- base model: "sha256-v2:" + sha256 over config.json and the full sha256 of every weights file, so a base that
  differs in any byte of any tensor is a different base (one element anywhere: tests/test_fingerprint.py). Hashing
  runs at about 1.4 GB/s here (benchmarks/fingerprint.py: GPT-NeoX-20B's 41.3 GB in about 30 s from the page cache;
  a cold disk's read speed bounds it below that), so each file's sha256 is cached by (path, size, mtime_ns, inode) in
  CACHE (FINETUNE_FINGERPRINT_CACHE
  overrides): paid once per base file, not per command. What gets through: a change that keeps a cached file's size,
  mtime_ns and inode (rewriting in place and then restoring the mtime by hand); delete the cache to re-read.
  Records from older runs (64 hex digits, no prefix) held the old sampled fingerprint (config, headers, 64 KiB at
  each end of each file): they are compared the old way, with a warning that it does not cover the whole file.
- data: sha256 over the exact token ids and labels that train and evaluate (template, tokenizer and length policy
  included, because they change the ids).
- run facts: the settings whose change makes a resumed run a different run (see RESUME_FIELDS).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

SAMPLE_BYTES = 64 * 1024  # the old sampled format
FORMAT = "sha256-v2"
CACHE_VARIABLE = "FINETUNE_FINGERPRINT_CACHE"
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "neo-finetune" / "weights-sha256.json"
CHUNK = 16 * 2**20

# fields compared on resume; a change is refused unless named in resume_allow_drift
RESUME_FIELDS = (
    "base_model",
    "dataset",
    "strategy",
    "seed",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "world_size",
    "max_length",
    "packing",
    "dtype",
    "objective",
    "learning_rate",
    "lr_scheduler_type",
    "max_steps",
    "num_train_epochs",
    "weight_decay",
    "warmup_steps",
)


def model_files(model_cfg) -> Path | None:
    """The local folder holding the base's config.json and weights (a local path or the Hub cache)."""
    path = Path(model_cfg.name_or_path).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(model_cfg.name_or_path, "config.json", revision=model_cfg.revision)
    return Path(config).parent if isinstance(config, str) else None


def base_model(folder: Path) -> str:
    """FORMAT:sha256 over config.json and each weights file's full sha256 (cached per file)."""
    digest = hashlib.sha256((folder / "config.json").read_bytes())
    cache = _read_cache()
    for path in _weights(folder):
        digest.update(f"{path.name}:{_file_sha256(path, cache)}\n".encode())
    _write_cache(cache)
    return f"{FORMAT}:{digest.hexdigest()}"


def sampled(folder: Path) -> str:
    """The old format (before sha256-v2): config, each shard's header and 64 KiB at each end of its data."""
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


def _weights(folder: Path) -> list[Path]:
    return sorted(p for pattern in ("*.safetensors", "*.bin") for p in folder.glob(pattern) if p.is_file())


def _cache_path() -> Path:
    return Path(os.environ.get(CACHE_VARIABLE) or CACHE)


def _read_cache() -> dict:
    try:
        return json.loads(_cache_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _write_cache(cache: dict) -> None:
    """Best effort (atomic replace; an unwritable cache only means hashing again next time)."""
    path = _cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        staging.write_text(json.dumps(cache, indent=1), encoding="utf-8")
        os.replace(staging, path)
    except OSError:
        pass


def _file_sha256(path: Path, cache: dict) -> str:
    stat = path.stat()
    key = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "inode": stat.st_ino}
    entry = cache.get(str(path.resolve()))
    if entry and all(entry.get(k) == v for k, v in key.items()):
        return entry["sha256"]
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    cache[str(path.resolve())] = {**key, "sha256": digest.hexdigest()}
    return digest.hexdigest()


def in_format_of(recorded: str, folder: Path) -> str | None:
    """The fingerprint of `folder` computed as `recorded` was (None: a format this version does not know)."""
    if recorded.startswith(FORMAT + ":"):
        return base_model(folder)
    return sampled(folder) if ":" not in recorded else None


def config_sha256(folder: Path) -> str:
    return hashlib.sha256((folder / "config.json").read_bytes()).hexdigest()


def base_record(
    model_cfg, folder: Path | None, hub_id: str | None, weights: str | None, quantization: dict | None = None
) -> dict:
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


def base_mismatch(recorded: dict, folder: Path, warn=None) -> list[str]:
    """How the base in `folder` differs from the recorded one (empty when it is the same checkpoint); `warn` is told
    when the record is in the old sampled format, which cannot see a change in the middle of a file."""
    lines = []
    if recorded.get("config_sha256") and recorded["config_sha256"] != (here := config_sha256(folder)):
        lines.append(f"config.json sha256 {recorded['config_sha256'][:16]}... at training, {here[:16]}... here")
    weights = recorded.get("weights_fingerprint")
    if not weights:
        return lines
    here = in_format_of(weights, folder)
    old = ":" not in weights
    note = (
        (" (recorded in the older format: config, headers and 64 KiB at each end of each weights file)") if old else ""
    )
    if here is None:
        lines.append(
            f"weights fingerprint {weights[:24]}... at training is in a format this version does not know "
            f"(it writes {FORMAT}); retrain, or use the version that trained"
        )
    elif here != weights:
        lines.append(f"weights fingerprint {weights[:16]}... at training, {here[:16]}... here{note}")
    elif old and warn:
        warn(
            "the base's weights fingerprint was recorded in the older format (config, headers and 64 KiB at each end "
            "of each weights file): a change in the middle of a tensor would not be seen; retrain to record a full one"
        )
    return lines


def dataset(samples: list, packed: bool) -> str:
    digest = hashlib.sha256(b"packed" if packed else b"unpacked")
    for sample in samples:
        digest.update(json.dumps(_token_fields(sample)).encode())
    return digest.hexdigest()


def _token_fields(sample) -> list:
    """What a sample trains on: SFT's ids and labels; a preference pair's or KTO row's ids (and label)."""
    if hasattr(sample, "labels"):
        return [sample.input_ids, sample.labels]
    return [value for key, value in vars(sample).items() if key != "where"]


def run_facts(cfg, strategy: dict, base: str, data: str, world_size: int) -> dict:
    """What must not change between a checkpoint and the run that resumes it."""
    trainer = cfg.trainer
    facts = {
        "base_model": base,
        "dataset": data,
        "strategy": strategy,
        "seed": cfg.seed,
        "world_size": world_size,
        "max_length": cfg.data.max_length,
        "packing": cfg.data.packing,
        "dtype": cfg.model.dtype,
        "objective": _objective(cfg),
    }
    for key in RESUME_FIELDS:
        if key not in facts:
            facts[key] = trainer.get(key)
    return json.loads(json.dumps(facts, default=str))


def _objective(cfg) -> dict | None:
    """The preference objective and its keys (init_from included); None for SFT, as checkpoints before objectives
    recorded it."""
    from omegaconf import OmegaConf

    objective = cfg.get("objective") or {}
    if objective.get("name", "sft") == "sft":
        return None
    return OmegaConf.to_container(objective) if OmegaConf.is_config(objective) else dict(objective)


def drift(saved: dict, current: dict, allowed: list[str]) -> list[str]:
    """One line per changed value that is not allowed: `field[.key]: checkpoint value -> this run's value`."""
    lines = []
    for key in RESUME_FIELDS:
        if key in allowed or saved.get(key) == current.get(key):
            continue
        old, new = saved.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):  # name the sub-keys that changed (strategy.r, ...)
            lines += [
                f"{key}.{sub}: {_short(old.get(sub))} in the checkpoint -> {_short(new.get(sub))} now"
                for sub in sorted(set(old) | set(new))
                if old.get(sub) != new.get(sub)
            ]
        else:
            lines.append(f"{key}: {_short(old)} in the checkpoint -> {_short(new)} now")
    return lines


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 80 else text[:77] + "..."
