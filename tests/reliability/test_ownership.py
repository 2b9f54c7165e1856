"""One run per output_dir, and a run deletes only what a run of ours wrote (issue 20 items 2 and 6;
finetune/runs/runlock.py).

Real `python -m finetune` processes on tiny GPT-NeoX (harness.py). The busy-directory test pauses the first run inside
its first optimizer step until the second has been refused, so the two always overlap, whatever the machine's speed.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from finetune.runs import checkpoints
from finetune.runs.runlock import LOCK

from harness import PROJECT, finetune, overrides

# The first run of the busy-directory test: stops in its first optimizer step, says so with a file, and goes on once
# the test has made the second run (or after 10 minutes, so that a failing test never leaves it behind).
PAUSED_RUN = """
import sys, time
from pathlib import Path
from finetune.train import trainer as guarded

paused, resume_when = Path(sys.argv[1]), Path(sys.argv[2])
training_step = guarded.GuardedSFTTrainer.training_step

def pausing_training_step(self, *args, **kwargs):
    if self.state.global_step == 1 and not paused.exists():
        paused.write_text("paused")
        deadline = time.monotonic() + 600
        while not resume_when.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
    return training_step(self, *args, **kwargs)

guarded.GuardedSFTTrainer.training_step = pausing_training_step
from finetune.__main__ import main
main(sys.argv[3:])
"""


def _snapshot(folder: Path) -> dict[str, str]:
    """Every path under `folder` with the sha256 of its content (directories: "dir"); tensorboard event files by name
    only (their writer thread may flush on its own)."""
    found = {}
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        if path.is_dir():
            found[name] = "dir"
        else:
            found[name] = (
                "tensorboard" if name.startswith("tensorboard/") else hashlib.sha256(path.read_bytes()).hexdigest()
            )
    return found


def _wait_for(path: Path, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 600  # a guard against a hung run, not a measurement
    while not path.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            pytest.fail(
                f"the first run did not reach its first step (exit {process.poll()}):\n{log.read_text()[-3000:]}"
            )
        time.sleep(0.5)


def test_a_second_run_on_a_busy_output_dir_is_refused_and_writes_nothing(tiny_models, tmp_path):
    """Item 2: both runs use overwrite=true (the demo default). The second exits 2 naming the first's pid and the lock,
    and changes nothing in the directory; the first finishes undisturbed: one log line per step, no quarantine."""
    run_dir, paused, go_on = tmp_path / "run", tmp_path / "paused", tmp_path / "go_on"
    script = tmp_path / "paused_run.py"
    script.write_text(PAUSED_RUN, encoding="utf-8")
    log = tmp_path / "first_stderr.txt"
    with log.open("w") as stderr:
        first = subprocess.Popen(
            [sys.executable, str(script), str(paused), str(go_on), *overrides(tiny_models["neox"], run_dir)],
            cwd=PROJECT,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        _wait_for(paused, first, log)
        before = _snapshot(run_dir)
        second = finetune(overrides(tiny_models["neox"], run_dir))
        after = _snapshot(run_dir)
    finally:
        go_on.write_text("go on")
        first.wait(timeout=600)
    first_stderr = log.read_text()
    assert second.returncode == 2, second.stderr[-3000:]
    assert f"pid {first.pid} on " in second.stderr and str(run_dir / LOCK) in second.stderr, second.stderr[-3000:]
    assert "is in use by another run" in second.stderr
    assert after == before  # nothing written: no run.json, no log line, no checkpoint moved
    assert first.returncode == 0, first_stderr[-3000:]
    steps = [
        json.loads(line)["step"] for line in (run_dir / "train_steps.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    assert steps == list(range(1, 11))
    assert not (run_dir / "checkpoints" / checkpoints.QUARANTINE).exists()
    assert json.loads((run_dir / "run.json").read_text())["status"] == "completed"
    assert (run_dir / LOCK).read_text() == ""  # released at the end: nothing stale for the next run to recover


def test_the_lock_of_a_killed_run_is_recovered(killed, tiny_models):
    """A run killed with SIGKILL leaves its lock file, naming it; the kernel has released the lock itself, so the next
    run takes it at once and says whose it was."""
    left = json.loads((killed / LOCK).read_text())
    assert left["pid"] and left["host"] and left["started"]
    result = finetune(overrides(tiny_models["neox"], killed, "resume=true"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"recovered the lock {killed / LOCK} left by pid {left['pid']}" in result.stderr
    assert json.loads((killed / "run.json").read_text())["status"] == "completed"


@pytest.mark.parametrize("overwrite", ["false", "true"])
def test_a_folder_that_is_not_a_run_is_refused_and_left_as_it_was(tiny_models, tmp_path, overwrite):
    """Item 6: DIR/checkpoints/my_model.pt is not ours; it used to be deleted, with exit 0."""
    folder = tmp_path / "mine"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "checkpoints" / "my_model.pt").write_bytes(b"my weights")
    before = _snapshot(folder)
    result = finetune(overrides(tiny_models["neox"], folder, f"overwrite={overwrite}"))
    assert result.returncode == 2, result.stderr[-3000:]
    assert (
        f"output_dir: {folder} is not a run directory and holds files no run wrote: checkpoints/my_model.pt"
        in result.stderr
    )
    assert "allow_foreign_files=true" in result.stderr and "choose another output_dir" in result.stderr
    assert _snapshot(folder) == before  # nothing deleted, nothing written (not even Hydra's train.log)


@pytest.mark.parametrize("value", ["", "''", ".", "'~'"])
def test_an_output_dir_that_is_not_a_folder_of_its_own_is_refused(tmp_path, value):
    """Item 6: `output_dir=''` made the current directory the run. Refused before anything loads or is written
    (HOME is a scratch folder here, so that without the check nothing real is touched)."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "finetune", f"output_dir={value}"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HOME": str(tmp_path / "home")},
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "output_dir:" in result.stderr and "name a folder of its own" in result.stderr
    assert list(cwd.iterdir()) == []


@pytest.mark.parametrize(
    "value, says",
    [
        ("''", "output_dir: empty, which would make the current directory"),
        ("/", "output_dir: '/' is the filesystem root"),
    ],
)
def test_validation_refuses_them_from_python_too(value, says):
    from finetune.config.compose import compose
    from finetune.config.validate import validate
    from finetune.errors import ConfigError

    with pytest.raises(ConfigError, match=says):
        validate(compose("demo", [f"output_dir={value}"]))


def test_a_new_run_removes_only_the_previous_runs_checkpoints(tiny_models, tmp_path):
    """overwrite=true in a run directory: the previous run's committed checkpoints go, file by file as their manifests
    list them; a checkpoint folder without a manifest is set aside, not deleted; a file no run wrote in checkpoints/
    is refused, and kept with allow_foreign_files=true; a foreign folder trains with allow_foreign_files=true."""
    from finetune.config.compose import compose
    from finetune.errors import ConfigError
    from finetune.train.run import run

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("my notes")
    short = ("trainer.max_steps=3", "trainer.save_steps=3")
    with pytest.raises(ConfigError, match="notes.txt"):
        run(compose("demo", overrides(tiny_models["neox"], run_dir, *short)))
    run(compose("demo", overrides(tiny_models["neox"], run_dir, *short, "allow_foreign_files=true")))
    assert (run_dir / "notes.txt").read_text() == "my notes"
    assert [c.name for c in checkpoints.candidates(run_dir / "checkpoints")] == ["checkpoint-3"]

    (run_dir / "checkpoints" / "my_model.pt").write_bytes(b"my weights")
    torn = run_dir / "checkpoints" / "checkpoint-1"
    torn.mkdir()
    (torn / "optimizer.pt").write_bytes(b"half")
    with pytest.raises(ConfigError, match=r"checkpoints holds files no run wrote: checkpoints/my_model.pt"):
        run(compose("demo", overrides(tiny_models["neox"], run_dir, *short)))
    assert (run_dir / "checkpoints" / "checkpoint-3" / checkpoints.MANIFEST).is_file()  # refused before any deletion

    run(
        compose(
            "demo",
            overrides(
                tiny_models["neox"], run_dir, "trainer.max_steps=2", "trainer.save_steps=2", "allow_foreign_files=true"
            ),
        )
    )
    assert (run_dir / "checkpoints" / "my_model.pt").read_bytes() == b"my weights"
    assert (run_dir / "notes.txt").read_text() == "my notes"
    assert [c.name for c in checkpoints.candidates(run_dir / "checkpoints")] == ["checkpoint-2"]  # checkpoint-3 removed
    set_aside = [p.name for p in (run_dir / "checkpoints" / checkpoints.QUARANTINE).iterdir() if p.is_dir()]
    assert len(set_aside) == 1 and set_aside[0].startswith("checkpoint-1-")
