"""run.json, the record of one run, and what a new attempt reads back from its run directory before it starts.

- run_record: run.json from a run's start to how it ended, the one place that decides the status and exit code it
  records (errors.py's codes); fields_at_start: what it says from the start.
- already_complete: the last attempt completed, so resume=true has nothing to do.
- previous_attempts: the attempts before this one, carried into the new run.json.
- resume_checkpoint: the newest complete checkpoint to continue from (torn or corrupt ones set aside).
- check_drift: a resume continues the same run (the facts its checkpoint's manifest recorded, against this run's).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from omegaconf import OmegaConf

from finetune.errors import EXIT_FAILURE, EXIT_OK, ConfigError, FinetuneError, IntegrityError, Preempted
from finetune.models import fingerprint
from finetune.runs import checkpoints, rundir
from finetune.runs.artifacts import config_hash, versions, write_json

RUN_JSON = "run.json"


class RunRecord:
    """run.json: written at start (status running) and rewritten at every change of state. A run opens it with
    `run_record`, which also writes how the run ended.

    `enabled=False` keeps the record in memory only: the other ranks of a distributed run share rank 0's run
    directory, and two processes renaming the same temporary file over run.json would fail or interleave."""

    def __init__(self, run_dir: Path, enabled: bool = True, **fields):
        self.path, self.enabled = run_dir / RUN_JSON, enabled
        self.data = {"status": "running", "started": _now(), "versions": versions(), **fields}
        self._write()

    def update(self, **fields) -> None:
        self.data.update(fields)
        self._write()

    def _write(self) -> None:
        if self.enabled:
            write_json(self.path, self.data)

    def finish(self, status: str, exit_code: int, **fields) -> None:
        self.update(status=status, exit_code=exit_code, finished=_now(), **fields)

    def complete(self) -> None:
        """Status "completed", exit code 0: call it last, once every output is written and sealed."""
        self.finish("completed", EXIT_OK)


@contextlib.contextmanager
def run_record(run_dir: Path, enabled: bool = True, **fields) -> Iterator[RunRecord]:
    """run.json for one run, from its start to how it ended.

    - entering writes it at once, before anything can fail: status "running", started, versions, `fields`;
    - inside, `record.update(...)` adds facts as they become known, and `record.complete()` says "completed"
      (exit 0). The run calls it last, once its card and manifest are written: a run killed before then is still
      "running", and resume=true finishes it;
    - an exception leaving the block is recorded, then re-raised unchanged: "preempted" for Preempted (exit 75, a
      scheduler's "requeue me": stopped at a committed checkpoint, or before the first step), "failed:<reason>"
      with its exit code for any other FinetuneError, "failed:<ExceptionType>" with exit 1 for anything else
      (KeyboardInterrupt and SystemExit included; the message cut at 2,000 characters). Each also sets `finished`
      and `error`;
    - leaving normally writes nothing more; a SIGKILL writes nothing at all (run.json says "running": resume=true
      judges such a run by its checkpoints).

    `enabled=False` (the other ranks of a distributed launch) keeps the record in memory only."""
    record = RunRecord(run_dir, enabled=enabled, **fields)
    try:
        yield record
    except FinetuneError as err:
        status = "preempted" if isinstance(err, Preempted) else f"failed:{err.reason}"
        record.finish(status, err.exit_code, error=str(err))
        raise
    except BaseException as err:
        record.finish(f"failed:{type(err).__name__}", EXIT_FAILURE, error=str(err)[:2000])
        raise


def fields_at_start(
    cfg, run_dir: Path, resume_from: Path | None, preset: str | None, overrides: list, precision: str
) -> dict:
    """What run.json says from the start: how the run was asked for (preset, overrides), what it trains, where it
    resumes from, the attempts before this one (from the run.json it replaces), and the precision it trains in."""
    return {
        "preset": preset,
        "overrides": overrides,
        "strategy": cfg.strategy.name,
        "base_model": cfg.model.name_or_path,
        "revision": cfg.model.revision,
        "seed": cfg.seed,
        "config_hash": config_hash(OmegaConf.to_container(cfg)),
        "resumed_from": resume_from.name if resume_from else None,
        "previous_attempts": previous_attempts(run_dir) if cfg.resume else [],
        "precision": precision,
    }


def read(run_dir: Path) -> dict:
    """The run.json in run_dir ({} when there is none)."""
    return rundir.read_json(run_dir / RUN_JSON)


def already_complete(run_dir: Path, say: Callable[[str], None]) -> bool:
    if read(run_dir).get("status") != "completed":
        return False
    say(f"run already complete ({run_dir / RUN_JSON}): nothing to resume; use overwrite=true to train again")
    return True


def previous_attempts(run_dir: Path) -> list[dict]:
    state = read(run_dir)
    attempts = state.get("previous_attempts", [])
    if state:
        attempts.append({k: state.get(k) for k in ("status", "started", "finished", "exit_code", "resumed_from")})
    return attempts


def resume_checkpoint(resume, run_dir: Path, say: Callable[[str], None]):
    """The newest complete checkpoint (torn ones set aside), "completed" for a finished run, or None (auto: fresh).
    `resume`: the config's (true or "auto")."""
    if already_complete(run_dir, say):
        return "completed"
    checkpoints_dir = run_dir / "checkpoints"
    found, set_aside = checkpoints.latest_complete(checkpoints_dir, lambda message: say(f"warning: {message}"))
    if found is not None:
        say(f"resuming from {found}")
        return found
    if resume == "auto":
        say(f"no complete checkpoint in {checkpoints_dir}: starting from step 0 (resume=auto)")
        return None
    torn = f"; set aside as torn or corrupt: {'; '.join(set_aside)}" if set_aside else ""
    raise IntegrityError(
        f"resume=true: no complete checkpoint in {checkpoints_dir}{torn}. Start again with overwrite=true, "
        "or use resume=auto to start from step 0 when there is nothing to resume"
    )


def check_drift(checkpoint: Path, facts: dict, allowed: list[str], base_folder: Path | None) -> None:
    """ConfigError when this run's facts differ from those `checkpoint` recorded, but for the `allowed` fields."""
    saved = checkpoints.manifest_of(checkpoint).get("run", {})
    recorded = str(saved.get("base_model", ""))
    if base_folder and recorded and recorded != facts["base_model"] and not recorded.startswith("unavailable:"):
        # a checkpoint from before the full-file fingerprint: compare the base the way it was fingerprinted then
        facts = {**facts, "base_model": fingerprint.in_format_of(recorded, base_folder) or facts["base_model"]}
    changes = fingerprint.drift(saved, facts, allowed)
    if changes:
        fields = ",".join(dict.fromkeys(c.split(":")[0].split(".")[0] for c in changes))
        raise ConfigError(
            [f"resume: {line}" for line in changes]
            + [
                f"resuming {checkpoint} with these changes would not continue the same run; undo them, or allow "
                f"named fields with resume_allow_drift=[{fields}]"
            ]
        )


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
