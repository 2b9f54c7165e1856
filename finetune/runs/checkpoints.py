"""Checkpoints that are complete or absent: staged, hashed, committed by rename, verified before resume.

transformers writes `checkpoint-N` in place and picks the newest folder on resume, so a crash during a save
leaves a torn checkpoint that resume then fails on (measured with transformers 5.23). Here every checkpoint is
written into `checkpoints/.staging/`, gets a MANIFEST.json with the sha256 of every file (written last), and is
renamed into place. On resume each candidate, newest first, is verified against its manifest; a torn or corrupted
one is moved to `checkpoints/.quarantine/` with the reason, and the previous complete one is used. Rotation runs
only after a commit and never removes the newest complete checkpoint or the best one.

The final weights folders get the same manifest (`seal`, written last, once the folder is complete): `adapter/` or
`model/` at the end of training, `merged/` by merge. merge, generate, evaluate (and embed) and push call
`check_final` before they use one: a file that differs from the manifest is an IntegrityError (exit 3) naming it.
A folder without a manifest (written before manifests existed, or copied or downloaded without one) is used with a
warning, unless its run.json or merge_report.json records that one was written: then it is refused.
`python -m finetune.checkpoints seal FOLDER` records a folder's current files (after you have checked them).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path

from finetune.errors import IntegrityError

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
            return (
                f"{path} has {path.stat().st_size} bytes, the manifest says {expected['bytes']} (truncated or replaced)"
            )
        actual = sha256(path)
        if actual != expected["sha256"]:
            return f"{path} has sha256 {actual[:16]}..., the manifest says {expected['sha256'][:16]}... (corrupted)"
    return None


# Files in a final weights folder that a loader (transformers, peft, tokenizers, an export's runtime) or push reads:
# one of these that is not in the manifest was added after the folder was sealed, and is refused; any other stray
# file is only named.
_READ_BY_LOADERS = re.compile(r"""(?x)^(
    adapter_config\.json | adapter_model\.(safetensors|bin) | config\.json | generation_config\.json
  | (model|pytorch_model)(-\d{5}-of-\d{5})?\.(safetensors|bin) | (model\.safetensors|pytorch_model\.bin)\.index\.json
  | tokenizer\.json | tokenizer_config\.json | special_tokens_map\.json | added_tokens\.json | vocab\.(json|txt)
  | merges\.txt | tokenizer\.model | chat_template\.(jinja|json) | base_model\.json | serving\.json | README\.md
  | merge_report\.json | .*\.safetensors | .*\.py
  | .*\.gguf | Modelfile | model\.bin | vocabulary\.(json|txt) | .*\.onnx | .*\.onnx\.data | onnx_config\.json
  | export\.json )$""")
_checked: dict[Path, tuple] = {}  # folder -> the (name, size, mtime_ns) of its files when it last verified


def seal(directory: Path, kind: str) -> None:
    """The manifest of a finished weights folder (adapter/, model/, merged/): written last, when nothing else will
    be written into it (see update_manifest for the card, which evaluate rewrites)."""
    write_manifest(directory, kind=kind)


def update_manifest(directory: Path, names) -> None:
    """After rewriting `names` in a sealed folder (the card and serving.json, a merge report, an evaluation report):
    record their new hashes and leave every other entry as it was, so nothing corrupt is blessed on the way.
    A folder without a manifest stays without one."""
    path = directory / MANIFEST
    if not path.is_file():
        return
    manifest = json.loads(path.read_text(encoding="utf-8"))
    for name in names:
        file = directory / name
        if file.is_file():
            _fsync(file)
            manifest["files"][name] = {"sha256": sha256(file), "bytes": file.stat().st_size}
    tmp = directory / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    _fsync(tmp)
    os.replace(tmp, path)
    _checked.pop(directory.resolve(), None)


def check_final(folder: Path, warn=None) -> None:
    """Before a final adapter/, model/ or merged/ folder is merged, loaded, evaluated or pushed: every file in its
    manifest is intact (IntegrityError naming the first that is not), and no file a loader would read was added.

    No manifest: refused when run.json (adapter/, model/) or merge_report.json (merged/) records that one was written;
    otherwise (a folder from before manifests existed, or copied without one) `warn` names the risk and the command
    that records one."""
    if warn is None:
        from finetune import console as cli

        warn = cli.say
    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        recorded = _recorded_manifest(folder)
        if recorded:
            raise IntegrityError(
                f"{folder / MANIFEST} is missing, but {recorded} records that it was written: the folder "
                "was not finished or was changed afterwards, so its files cannot be trusted. Check them (or "
                f"train / merge again), then record them with: python -m finetune.checkpoints seal {folder}"
            )
        warn(
            f"warning: {folder} has no {MANIFEST} (written before neo-finetune recorded manifests, or copied without "
            "it): its files cannot be checked for corruption. After checking them, record them with: "
            f"python -m finetune.checkpoints seal {folder}"
        )
        return
    stats = _stats(folder)
    if _checked.get(folder.resolve()) == stats:  # verified in this process and unchanged since (size, mtime)
        return
    problem = verify(folder)
    if problem and problem.endswith("(unexpected file)"):
        problem, strays = _split_strays(folder)
        if strays:
            warn(
                f"warning: {folder}: {', '.join(strays)} not in {MANIFEST}; nothing reads "
                f"{'it' if len(strays) == 1 else 'them'} "
                "(ignored)"
            )
    if problem:
        raise IntegrityError(
            f"{problem}: {folder} is not what was written (see {folder / MANIFEST}); refusing to use it. "
            "Restore the folder from a good copy, or train (merge) again"
        )
    _checked[folder.resolve()] = stats


def _split_strays(folder: Path) -> tuple[str | None, list[str]]:
    """verify() without the unexpected files nothing reads: (the first real problem or None, those files)."""
    files = manifest_of(folder)["files"]
    present = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    extra = [name for name in present if name not in files]
    read = [name for name in extra if _READ_BY_LOADERS.match(name)]
    if read:
        return f"{folder / read[0]} is not in the manifest (a file added after the folder was written)", []
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing", extra
        if path.stat().st_size != expected["bytes"]:
            return (
                f"{path} has {path.stat().st_size} bytes, the manifest says {expected['bytes']} (truncated or "
                "replaced)",
                extra,
            )
        actual = sha256(path)
        if actual != expected["sha256"]:
            return (
                f"{path} has sha256 {actual[:16]}..., the manifest says {expected['sha256'][:16]}... (corrupted)",
                extra,
            )
    return None, extra


def _recorded_manifest(folder: Path) -> str | None:
    """Which record says this folder was sealed: run.json (`weights_manifest`), its merge_report.json or its
    export.json."""
    for record, key, expected in (
        (folder.parent / "run.json", "weights_manifest", f"{folder.name}/{MANIFEST}"),
        (folder / "merge_report.json", "manifest", MANIFEST),
        (folder / "export.json", "manifest", MANIFEST),
    ):
        try:
            data = json.loads(record.read_text(encoding="utf-8")) if record.is_file() else {}
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get(key) == expected:
            return str(record)
    return None


def _stats(folder: Path) -> tuple:
    return tuple(
        sorted(
            (p.relative_to(folder).as_posix(), st.st_size, st.st_mtime_ns)
            for p in folder.rglob("*")
            if p.is_file()
            for st in [p.stat()]
        )
    )


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
    return sorted(
        (p for p in checkpoints_dir.iterdir() if p.is_dir() and _NAME.match(p.name)), key=step_of, reverse=True
    )


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


def main(argv: list[str] | None = None) -> None:
    """`finetune checkpoints seal FOLDER`: record the current files of a final weights folder (one written before
    manifests existed, or one whose missing manifest you have checked) in its MANIFEST.json.
    `finetune checkpoints verify FOLDER`: check a folder against its MANIFEST.json (exit 3 naming the file that
    differs)."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    usage = "usage: finetune checkpoints seal|verify FOLDER   (an adapter/, model/, merged/ or checkpoint-N folder)"
    if args[:1] in (["-h"], ["--help"]):
        print(f"{main.__doc__}\n\n{usage}")
        return
    if len(args) != 2 or args[0] not in ("seal", "verify") or not Path(args[1]).is_dir():
        print(usage, file=sys.stderr)
        sys.exit(2)
    folder = Path(args[1])
    if args[0] == "verify":
        problem = verify(folder)
        if problem:
            print(f"error: {folder}: {problem}", file=sys.stderr)
            sys.exit(3)
        print(f"verified {folder}: {len(manifest_of(folder)['files'])} files match {folder / MANIFEST}")
        return
    kind = (
        "adapter"
        if (folder / "adapter_config.json").is_file()
        else "merged"
        if (folder / "merge_report.json").is_file()
        else "model"
    )
    seal(folder, kind)
    print(f"sealed {folder}: {len(manifest_of(folder)['files'])} files recorded in {folder / MANIFEST}")


if __name__ == "__main__":
    main()
