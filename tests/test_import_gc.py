"""finetune.import_gc: the collector is paused from the process entry until the command's libraries are imported,
then runs again with the import-time objects frozen; a subcommand's main() always runs with it on."""

from __future__ import annotations

import gc
import subprocess
import sys

from finetune import cli, import_gc


def test_pause_and_resume_in_a_fresh_process():
    code = """
import gc
from finetune import import_gc
import_gc.pause(); import_gc.pause()  # twice: one pause
assert not gc.isenabled()
import json, email.parser  # objects made while paused
import_gc.resume()
assert gc.isenabled() and gc.get_freeze_count() > 0
import_gc.resume()  # nothing more to do
print("ok")
"""
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "ok\n"


def test_a_paused_collector_is_left_alone_when_it_was_off():
    gc.disable()
    try:
        import_gc.pause()
        import_gc.resume()
        assert not gc.isenabled()  # someone else turned it off: theirs to turn on
    finally:
        gc.enable()


def test_a_subcommand_runs_with_the_collector_on(tmp_path, monkeypatch):
    (tmp_path / "gc_probe_command.py").write_text(
        "import gc\nSEEN = []\ndef main(argv):\n    SEEN.append((gc.isenabled(), gc.get_freeze_count()))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.COMMANDS, "probe", cli.Command("gc_probe_command", "test"))
    import_gc.pause()
    try:
        cli.main(["probe"])
    finally:
        import_gc.resume()
        gc.unfreeze()
    import gc_probe_command

    assert gc_probe_command.SEEN[0][0] is True and gc_probe_command.SEEN[0][1] > 0
