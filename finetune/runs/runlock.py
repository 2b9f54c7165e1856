"""One run at a time per output_dir, and a run only ever removes what a run of ours wrote (issue 20 items 2 and 6).

**The lock.** Rank 0 takes `output_dir/.finetune.lock` with flock(LOCK_EX | LOCK_NB) on a descriptor it keeps open for
the whole run; the file records pid, host, start time and command, which is what a refused second run names. The
kernel releases a flock when its process ends in any way, `kill -9` included, so a lock can never outlive its run:
the next run takes it over at once, and when the file still names a process (a run that ended normally empties it
before letting go), says that it recovered it. The other ranks of a distributed launch share rank 0's directory and
never touch the lock (finetune.ranks).

**What is ours.** A directory is a run of ours when it holds our `run.json` (written first thing by every run, with a
`status`). In any other directory a run only accepts the lock and Hydra's `train.log`; anything else there is
somebody else's: refused, naming the files, unless `allow_foreign_files=true`, and even then never a file under a
name a run writes (it would be replaced). In a run of ours, a new run (`overwrite=true`) removes the previous run's
checkpoints file by file as their MANIFEST.json lists them, sets one without a manifest aside in
`checkpoints/.quarantine/` (moved, never deleted), and refuses when `checkpoints/` holds anything else but trl's model
card (README.md, which the next save rewrites). Files a run of ours did not write at
the top of a run directory (your notes, the tools' outputs) are never touched. An
`output_dir` that is empty, `.`, the current, home or project directory, `/`, or a folder above one of them is refused.

Checked twice: by the CLI before Hydra starts (Hydra opens `train.log` in output_dir, so a refused run writes nothing
there), and by train.run / validate for runs started from Python. Cheap to import: no torch.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import socket
import sys
import time
from pathlib import Path

from finetune import ranks
from finetune.errors import ConfigError
from finetune.runs import checkpoints

LOCK = ".finetune.lock"
HYDRA_LOG = "train.log"  # Hydra opens it (append) in output_dir before the run starts; never removed
PROJECT = Path(__file__).resolve().parents[2]  # the checkout (or the site-packages folder) holding finetune/
# What training writes at the top level of output_dir (README "Outputs"); the tools run on a run directory afterwards
# (merge, evaluate, push, embed) check their own out= themselves.
TRAINING_WRITES = frozenset(
    {
        "run.json",
        "config.yaml",
        "data_template.yaml",
        "metrics.json",
        "loss.png",
        "samples.json",
        "rejected_rows.jsonl",
        "train_steps.jsonl",
        "tracking.json",
        "report.html",
        "adapter",
        "model",
        "checkpoints",
        "tensorboard",
        "wandb",
        "mlruns",
    }
)
_CHECKPOINT_ENTRY = re.compile(r"^(checkpoint-\d+|\.staging|\.quarantine)$")
TRAINER_CARD = "README.md"  # trl writes its model card into the trainer's output_dir, our checkpoints/, at each save
_NAMED = 8  # files named in a message; the rest are counted
_FIX = (
    "choose another output_dir=PATH (a new or empty folder), move those files away, or pass allow_foreign_files=true "
    "to train beside them (a run never deletes, moves or overwrites a file it did not write)"
)


# ---- which output_dir is acceptable at all ----


def unsafe_output_dir(value) -> str | None:
    """The problem with an output_dir that would make a run write among unrelated files: '', '.', the current, home
    or project directory, the filesystem root, or a folder above any of them."""
    text = "" if value is None else str(value).strip()
    if not text:
        return (
            f"output_dir: empty, which would make the current directory ({Path.cwd()}) the run directory; a run "
            "writes and replaces files in its output_dir: name a folder of its own, e.g. output_dir=runs/NAME"
        )
    path = Path(text).expanduser().resolve()
    if path.parent == path:
        return f"output_dir: '{text}' is the filesystem root; name a folder of its own, e.g. output_dir=runs/NAME"
    places = (
        ("the current directory", Path.cwd().resolve()),
        ("your home directory", Path.home().resolve()),
        ("the project directory", PROJECT),
    )
    for what, place in places:
        if path == place or path in place.parents:
            where = what if path == place else f"a folder above {what} ({place})"
            return (
                f"output_dir: '{text}' is {path}, {where}; a run writes and replaces files in its output_dir: "
                "name a folder of its own, e.g. output_dir=runs/NAME"
            )
    return None


# ---- what a run of ours wrote ----


def is_run_dir(path: Path) -> bool:
    """True when `path` holds the run.json a run of ours writes before anything else."""
    try:
        record = json.loads((path / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and "status" in record


def ownership_problem(out: Path, allow_foreign: bool) -> str | None:
    """Why a run may not start in `out` (None: it may). A run of ours is judged by train.run (its checkpoints/)."""
    if out.exists() and not out.is_dir():
        return f"output_dir: {out} is a file, not a folder; choose another output_dir=PATH"
    if not out.is_dir() or is_run_dir(out):
        return None
    entries = sorted(e for e in out.iterdir() if e.name not in (LOCK, HYDRA_LOG))
    if not entries:
        return None
    if not allow_foreign:
        return (
            f"output_dir: {out} is not a run directory and holds files no run wrote: "
            f"{_name(_files(entries, out))}; {_FIX}"
        )
    clashes = [e for e in entries if e.name in TRAINING_WRITES and e.name != "checkpoints"]
    if (out / "checkpoints").is_dir():
        clashes += [
            e
            for e in sorted((out / "checkpoints").iterdir())
            if _CHECKPOINT_ENTRY.match(e.name) or e.name == TRAINER_CARD
        ]
    if clashes:
        return (
            f"output_dir: {out} holds files no run wrote under names a run writes: {_name(_files(clashes, out))}; "
            "allow_foreign_files=true never lets a run replace them: move them away or choose another output_dir=PATH"
        )
    return None


def output_dir_problems(cfg: dict) -> list[str]:
    """validate.py's checks of output_dir: where it is, and (rank 0) whose files it holds."""
    problem = unsafe_output_dir(cfg.get("output_dir"))
    if problem is None and ranks.is_main():
        problem = ownership_problem(Path(str(cfg["output_dir"])).expanduser(), bool(cfg.get("allow_foreign_files")))
    return [problem] if problem else []


def clear_for_fresh_run(checkpoints_dir: Path, allow_foreign: bool, say) -> None:
    """A new run in a run directory of ours (overwrite=true, or resume=auto with nothing to resume): the previous run's
    checkpoints would be resumed or rotated as this run's. Remove each committed one by its MANIFEST.json; set one
    without a manifest aside (moved, not deleted); refuse when checkpoints/ holds files no run wrote."""
    if not checkpoints_dir.is_dir():
        return
    foreign, committed, torn = [], [], []
    for entry in sorted(checkpoints_dir.iterdir()):
        if entry.name == TRAINER_CARD and _is_trainer_card(entry):
            continue  # rewritten by the next save
        if not _CHECKPOINT_ENTRY.match(entry.name) or entry.is_symlink() or not entry.is_dir():
            foreign.append(entry)
        elif entry.name.startswith("checkpoint-"):
            listed = _manifest_files(entry)
            if listed is None:
                torn.append(entry)
                continue
            committed.append((entry, listed))
            unlisted = [
                p
                for p in _walk(entry)
                if p.relative_to(entry).as_posix() not in listed and p.name != checkpoints.MANIFEST
            ]
            foreign += unlisted
    out = checkpoints_dir.parent
    inside_checkpoints = [p for p in foreign if p.parent != checkpoints_dir]
    if foreign and (not allow_foreign or inside_checkpoints):
        allowed = "" if inside_checkpoints else " or pass allow_foreign_files=true to keep them there"
        raise ConfigError(
            f"output_dir: {checkpoints_dir} holds files no run wrote: {_name(_files(foreign, out))}; a new run "
            f"removes the previous run's checkpoints, by their MANIFEST.json, and nothing else: move those "
            f"files away, choose another output_dir=PATH{allowed}"
        )
    for folder, listed in committed:
        _delete_listed(folder, listed)
    for folder in torn:
        moved = checkpoints.quarantine(
            folder,
            "a new run started in this output_dir (overwrite=true); this folder has no "
            "MANIFEST.json, so it was set aside, not deleted",
        )
        say(f"checkpoint {folder.name} has no manifest: set aside in {moved}, not deleted")
    if committed:
        say(
            f"new run: removed the previous run's {len(committed)} checkpoint(s) from {checkpoints_dir} (each by its "
            "MANIFEST.json)"
        )


def _is_trainer_card(path: Path) -> bool:
    try:
        return (
            path.is_file()
            and not path.is_symlink()
            and "generated_from_trainer" in path.read_text(encoding="utf-8", errors="replace")
        )
    except OSError:
        return False


def _manifest_files(folder: Path) -> set[str] | None:
    try:
        files = checkpoints.manifest_of(folder)["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return set(files) if isinstance(files, dict) else None


def _delete_listed(folder: Path, listed: set[str]) -> None:
    """Delete the files a manifest lists (and the manifest), then the folders left empty; nothing outside `folder`."""
    root = folder.resolve()
    for name in listed:
        path = folder / name
        if ".." in Path(name).parts or Path(name).is_absolute() or root not in path.resolve().parents:
            continue
        if path.is_file() or path.is_symlink():
            path.unlink()
    (folder / checkpoints.MANIFEST).unlink(missing_ok=True)
    for sub in sorted(
        (p for p in folder.rglob("*") if p.is_dir() and not p.is_symlink()), key=lambda p: len(p.parts), reverse=True
    ):
        if not any(sub.iterdir()):
            sub.rmdir()
    if not any(folder.iterdir()):
        folder.rmdir()


def _walk(path: Path) -> list[Path]:
    """Files (and links) under `path`, without following links."""
    found = []
    for root, dirs, files in os.walk(path):
        found += [Path(root) / name for name in files]
        found += [Path(root) / d for d in dirs if (Path(root) / d).is_symlink()]
    return sorted(found)


def _files(entries: list[Path], base: Path) -> list[str]:
    named = []
    for entry in entries:
        inner = _walk(entry) if entry.is_dir() and not entry.is_symlink() else [entry]
        named += [p.relative_to(base).as_posix() for p in inner] or [
            entry.relative_to(base).as_posix() + "/ (empty folder)"
        ]
    return named


def _name(files: list[str]) -> str:
    more = f" and {len(files) - _NAMED} more" if len(files) > _NAMED else ""
    return ", ".join(files[:_NAMED]) + more


# ---- the lock ----


def holder(path: Path) -> dict:
    """What the lock file says about the run holding it ({} when empty or unreadable)."""
    try:
        record = json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def held_problem(out: Path) -> str | None:
    """Read-only test whether another run holds out's lock (a shared flock that conflicts with the holder's)."""
    path = out / LOCK
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _held_message(path)
    finally:
        os.close(fd)  # releases the probe's shared lock
    return None


def _held_message(path: Path) -> str:
    who = holder(path)
    if who.get("pid"):
        elsewhere = "" if who.get("host") in (None, socket.gethostname()) else " (another machine)"
        running = (
            f"pid {who['pid']} on {who.get('host', '?')}{elsewhere}, started {who.get('started', '?')}: "
            f"{who.get('command', '?')}"
        )
    else:
        running = "pid not recorded yet: it is just starting"
    return (
        f"output_dir: {path.parent} is in use by another run ({running}); its lock is {path}. Two runs in one "
        "output_dir would mix their logs and checkpoints: wait for that run to end (or stop it), or choose another "
        "output_dir=PATH"
    )


def _program() -> str:
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    return "python -m finetune" if name == "__main__.py" else name


class RunLock:
    """Held for the lifetime of one run by rank 0: `with RunLock(run_dir, enabled=ranks.is_main(), say=cli.say):`."""

    def __init__(self, run_dir: Path, enabled: bool = True, say=print):
        self.path, self.enabled, self.say, self.fd = Path(run_dir) / LOCK, enabled, say, None

    def __enter__(self) -> RunLock:
        if not self.enabled:
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        for attempt in range(20):  # a concurrent read-only probe (held_problem) holds a shared lock for microseconds
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt == 19 or holder(self.path).get("pid"):
                    os.close(fd)
                    raise ConfigError(_held_message(self.path)) from None
                time.sleep(0.05)
        previous = holder(self.path)
        if previous.get("pid"):
            self.say(
                f"output_dir: recovered the lock {self.path} left by pid {previous['pid']} on "
                f"{previous.get('host', '?')} "
                f"(started {previous.get('started', '?')}), which ended without releasing it (killed or crashed); "
                "its process no longer holds it"
            )
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": " ".join([_program(), *sys.argv[1:]])[:1000],
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        os.fsync(fd)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)  # ended normally (or with an error we report): nothing stale is left to recover
        except OSError:
            pass
        finally:
            os.close(self.fd)  # releases the flock
            self.fd = None


# ---- before Hydra starts (python -m finetune) ----


def before_start(config_name: str, overrides: list[str]) -> list[str]:
    """output_dir's problems before Hydra opens train.log there: a refused run writes nothing into it. Rank 0 also
    checks the lock and whose files the folder holds; validate and train.run check again (the Python entry)."""
    from finetune.config.compose import compose

    try:
        cfg = compose(config_name, overrides)
        value, allow = cfg.output_dir, bool(cfg.get("allow_foreign_files", False))
    except Exception:  # noqa: BLE001 - does not compose or resolve: validate() reports it with the key
        return []
    problem = unsafe_output_dir(value)
    if problem is None and ranks.is_main():
        out = Path(str(value)).expanduser()
        problem = held_problem(out) or ownership_problem(out, allow)
    return [problem] if problem else []


def safe_to_record_in(run_dir: Path) -> bool:
    """Whether a refused sweep job may leave a run.json in `run_dir` (never among files that are not ours)."""
    return not run_dir.exists() or is_run_dir(run_dir) or ownership_problem(run_dir, False) is None
