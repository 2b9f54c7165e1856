"""Checkpoints that are complete or absent: staged, hashed, committed by rename, verified before resume.

transformers writes `checkpoint-N` in place and picks the newest folder on resume, so a crash during a save
leaves a torn checkpoint that resume then fails on (measured with transformers 5.23). Here every checkpoint is
written into `checkpoints/.staging/`, gets a MANIFEST.json with the sha256 of every file (written last), and is
renamed into place. On resume each candidate, newest first, is verified against its manifest; a torn or corrupted
one is moved to `checkpoints/.quarantine/` with the reason, and the previous complete one is used. Rotation runs
only after a commit and never removes the newest complete checkpoint or the best one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path

MANIFEST = "MANIFEST.json"
STAGING = ".staging"
QUARANTINE = ".quarantine"
FORMAT = 1
_NAME = re.compile(r"^checkpoint-(\d+)$")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: Path, **facts) -> None:
    """Hash every file (after fsync) and write the manifest last, atomically: its presence means complete."""
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST):
        _fsync(path)
        files[path.relative_to(directory).as_posix()] = {"sha256": sha256(path), "bytes": path.stat().st_size}
    tmp = directory / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"format": FORMAT, "files": files, **facts}, indent=1), encoding="utf-8")
    _fsync(tmp)
    os.replace(tmp, directory / MANIFEST)


def verify(directory: Path) -> str | None:
    """None if every file matches the manifest; else the first problem, naming the file."""
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        return f"{manifest_path} is missing: the save did not finish"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = manifest["files"]
    except (ValueError, KeyError) as err:
        return f"{manifest_path} is unreadable ({err})"
    present = {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST}
    unexpected = sorted(present - set(files))
    if unexpected:
        return f"{directory / unexpected[0]} is not in the manifest (unexpected file)"
    for name, expected in files.items():
        path = directory / name
        if name not in present:
            return f"{path} is missing"
        if path.stat().st_size != expected["bytes"]:
            return f"{path} has {path.stat().st_size} bytes, the manifest says {expected['bytes']} (truncated or replaced)"
        actual = sha256(path)
        if actual != expected["sha256"]:
            return f"{path} has sha256 {actual[:16]}..., the manifest says {expected['sha256'][:16]}... (corrupted)"
    return None


def manifest_of(directory: Path) -> dict:
    return json.loads((directory / MANIFEST).read_text(encoding="utf-8"))


def commit(staged: Path, final: Path) -> None:
    """Move a staged checkpoint into place; a stale folder of the same name is quarantined first."""
    if final.exists():
        quarantine(final, "replaced by a newer save of the same step")
    os.replace(staged, final)
    _fsync_dir(final.parent)


def step_of(path: Path) -> int:
    return int(_NAME.match(path.name).group(1))


def candidates(checkpoints_dir: Path) -> list[Path]:
    """checkpoint-N folders, newest first (by step, not mtime)."""
    if not checkpoints_dir.is_dir():
        return []
    return sorted((p for p in checkpoints_dir.iterdir() if p.is_dir() and _NAME.match(p.name)), key=step_of, reverse=True)


def latest_complete(checkpoints_dir: Path, warn, set_aside_torn: bool = True) -> tuple[Path | None, list[str]]:
    """The newest checkpoint that verifies; torn or corrupt ones on the way are quarantined, with `warn(message)`.

    `set_aside_torn=False` (the other ranks of a distributed run) only skips them: rank 0 moves them, and a folder
    that rank 0 moves away during the check counts as torn here too, so every rank picks the same checkpoint."""
    set_aside = []
    for candidate in candidates(checkpoints_dir):
        try:
            problem = verify(candidate)
        except OSError as err:  # moved away by rank 0 while this rank was reading it
            problem = f"{candidate} could not be read ({err})"
        if problem is None:
            return candidate, set_aside
        if not set_aside_torn:
            set_aside.append(f"{candidate.name}: {problem}")
            continue
        moved = quarantine(candidate, problem)
        set_aside.append(f"{candidate.name}: {problem}")
        warn(f"checkpoint {candidate.name} is incomplete or corrupt and was set aside ({moved}): {problem}")
    return None, set_aside


def quarantine(path: Path, reason: str) -> Path:
    """Move a folder out of the way (never delete evidence) and write why next to it."""
    target_dir = path.parent / QUARANTINE
    target_dir.mkdir(exist_ok=True)
    target = target_dir / f"{path.name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    os.replace(path, target)
    (target_dir / f"{target.name}.reason.txt").write_text(reason + "\n", encoding="utf-8")
    return target


def rotate(checkpoints_dir: Path, keep: int | None, best: Path | None) -> list[Path]:
    """Delete complete checkpoints beyond the newest `keep`; never the newest complete one, never the best."""
    if not keep:
        return []
    complete = [c for c in candidates(checkpoints_dir) if (c / MANIFEST).is_file()]
    protected = set(complete[: max(keep, 1)]) | ({Path(best).resolve()} if best else set())
    removed = [c for c in complete if c not in protected and c.resolve() not in protected]
    for c in removed:
        shutil.rmtree(c)
    return removed


def clear_staging(checkpoints_dir: Path) -> None:
    """Leftovers of a save that crashed: never a checkpoint, always safe to remove."""
    shutil.rmtree(checkpoints_dir / STAGING, ignore_errors=True)


def _fsync(path: Path) -> None:
    with path.open("rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
