"""Cost of the base-model fingerprint (finetune.fingerprint, sha256-v2: every byte of every weights file).

    python benchmarks/fingerprint.py               # 4 shards of 1 GiB (GPT-NeoX-20B's shards are 46 x ~0.9 GB)
    python benchmarks/fingerprint.py --gib 8 --shard-gib 2

Writes a model folder of random bytes in safetensors-sized shards plus a config.json (the fingerprint reads files, not
tensors), then times, each in a fresh cache:
- first: every file hashed (the cost paid once per base file; with the files in the page cache, as right after a
  download or a training run read them, it is the hashing speed; from a cold disk, the disk's read speed bounds it);
- cached: the same call again (path, size, mtime_ns, inode unchanged: a stat per file);
and projects both to GPT-NeoX-20B's 41.3 GB. Prints a table; nothing is compared against a baseline because the
previous sampled fingerprint (64 KiB per file end) missed changes in the middle of a tensor (issue 19).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

NEOX_20B_BYTES = 41.3e9


def build(folder: Path, gib: float, shard_gib: float) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt_neox", "benchmark": True}))
    total, index, chunk = int(gib * 2**30), 0, os.urandom(64 * 2**20)
    written = 0
    while written < total:
        size = min(int(shard_gib * 2**30), total - written)
        with open(folder / f"model-{index:05d}.safetensors", "wb") as out:
            for start in range(0, size, len(chunk)):
                out.write(chunk[: min(len(chunk), size - start)])
        written, index = written + size, index + 1
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=4.0)
    parser.add_argument("--shard-gib", type=float, default=1.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fingerprint-bench-") as work:
        work = Path(work)
        os.environ["FINETUNE_FINGERPRINT_CACHE"] = str(work / "cache.json")
        from finetune.models import fingerprint

        size = build(work / "model", args.gib, args.shard_gib)
        started = time.perf_counter()
        first = fingerprint.base_model(work / "model")
        first_s = time.perf_counter() - started
        started = time.perf_counter()
        again = fingerprint.base_model(work / "model")
        cached_s = time.perf_counter() - started
        assert first == again
    rate = size / first_s
    print(f"| {size / 2**30:.1f} GiB in {args.shard_gib:g} GiB shards | seconds | GB/s |")
    print("|---|---:|---:|")
    print(f"| first fingerprint (every byte hashed) | {first_s:.2f} | {rate / 1e9:.2f} |")
    print(f"| cached re-check (stat per file) | {cached_s:.4f} | |")
    print(f"| projected: GPT-NeoX-20B 41.3 GB, first | {NEOX_20B_BYTES / rate:.0f} | |")


if __name__ == "__main__":
    main()
