"""finetune.fast_exit: a finished command leaves with its own exit code and all its output, after every atexit
handler registered after it, but without the interpreter's teardown (1.5-2 s with torch loaded); an error, or an entry
that something else called (a wrapper, a test), exits as Python always does."""

from __future__ import annotations

import subprocess
import sys

import pytest

SCRIPT = """
import atexit, sys
from finetune import fast_exit

class Teardown:
    def __del__(self):
        sys.__stdout__.write(" finalized")  # runs only when the interpreter tears its modules down

KEEP = Teardown()

def main():
    atexit.register(lambda: sys.stdout.write(" handler"))  # a library's handler, registered after the entry's
    sys.stdout.write("output")  # left in the buffer
    {end}

def command():  # as finetune/__main__.py's console-script entry
    return fast_exit.run(main, returned_is_code={returned_is_code})

{call}
"""


def _run(tmp_path, end, returned_is_code=True, call="sys.exit(command())", wrapped=False):
    script = tmp_path / "entry.py"
    script.write_text(SCRIPT.format(end=end, returned_is_code=returned_is_code, call=call))
    argv = (
        [sys.executable, "-c", f"import runpy; runpy.run_path({str(script)!r})"]
        if wrapped
        else [sys.executable, str(script)]
    )
    return subprocess.run(argv, capture_output=True, text=True)


@pytest.mark.parametrize(
    ("end", "returned_is_code", "call", "code"),
    [
        ("return None", True, "sys.exit(command())", 0),
        ("return 7", True, "sys.exit(command())", 7),
        ("return 7", False, "command()", 0),  # python -m drops the return value
        ("sys.exit(3)", True, "sys.exit(command())", 3),
    ],
)
def test_a_finished_command_keeps_its_code_and_output_and_skips_teardown(tmp_path, end, returned_is_code, call, code):
    done = _run(tmp_path, end, returned_is_code, call)
    assert done.returncode == code, done.stderr
    assert done.stdout == "output handler"  # flushed, the later handler ran, no teardown


@pytest.mark.parametrize("end", ["raise ValueError('boom')", "sys.exit('a message')"])
def test_an_error_exits_the_normal_way(tmp_path, end):
    done = _run(tmp_path, end)
    assert done.returncode == 1
    assert done.stdout == "output handler finalized"  # Python's own exit, teardown included
    assert "boom" in done.stderr or "a message" in done.stderr


def test_an_entry_called_by_a_wrapper_exits_the_normal_way(tmp_path):
    done = _run(tmp_path, "return None", wrapped=True)  # runpy.run_path from `python -c`: a wrapper's frames below
    assert done.returncode == 0 and done.stdout == "output handler finalized"


def test_the_cli_exits_with_its_codes():
    ok = subprocess.run([sys.executable, "-m", "finetune", "--help"], capture_output=True, text=True)
    assert ok.returncode == 0 and "finetune" in ok.stdout
    unknown = subprocess.run([sys.executable, "-m", "finetune", "nosuchcommand"], capture_output=True, text=True)
    assert unknown.returncode == 2 and "unknown command 'nosuchcommand'" in unknown.stderr
