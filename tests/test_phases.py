"""finetune.runs.phases: a run records where its time went (run.json's phase_seconds)."""

from __future__ import annotations

import json
import time

import pytest

from finetune.runs import phases


def test_phases_add_up_and_a_failed_phase_is_still_timed():
    clock = phases.PhaseClock()
    assert clock.timed("sleep", time.sleep, 0.05) is None
    clock.timed("sleep", time.sleep, 0.05)  # the same phase twice: added
    with pytest.raises(ZeroDivisionError):
        clock.timed("fails", lambda: 1 / 0)
    assert 0.1 <= clock.seconds["sleep"] < 1.0 and "fails" in clock.seconds
    assert "startup" not in phases.PhaseClock().seconds  # only the process's first run started it


def test_process_age_is_read_from_proc():
    age = phases.since_process_start()
    assert age is not None and 0.0 < age < 24 * 3600


def test_a_run_records_its_phases(tiny_run):
    seconds = json.loads((tiny_run / "run.json").read_text())["phase_seconds"]
    assert {"data", "arguments", "model", "trainer", "before", "train", "after"} <= seconds.keys()
    assert all(value >= 0 for value in seconds.values()) and seconds["train"] > 0
