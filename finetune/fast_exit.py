"""End a finished command without the interpreter's teardown.

Once a command has returned, Python still finalizes every module before the process ends: with torch, transformers,
peft, trl and bitsandbytes loaded that is 1.5-2 s on a 2-core machine (atexit-to-exit of a script that only imports
them), spent freeing memory the operating system frees at once anyway, on every `finetune` command, a training run
included (benchmarks/RESULTS.md, issue 26).

`run(main)` registers an atexit handler before anything heavy is imported; registered after only Python's own early
ones, it runs after every library's handlers (tensorboard, wandb, accelerate) and after non-daemon threads were
joined. If the command ended normally or through `sys.exit(int)`, it shuts logging down, flushes stdout and stderr,
and leaves with `os._exit` and that same code. Python's normal exit stays for everything else:
- a traceback, a non-integer exit message, a KeyboardInterrupt;
- a process where our entry is not the outermost code: a wrapper (a test, `python -m cProfile`, a launcher script)
  called it, and may hold atexit work registered before ours, as may coverage's start-up hook (coverage loaded).
"""

from __future__ import annotations

import atexit
import os
import sys
from collections.abc import Callable

_code: list[int] = []  # the exit code to leave with; empty: let Python finish normally
_PYTHON_M = ("_run_module_as_main", "_run_code")  # runpy's frames under `python -m finetune`, outermost first


def run(main: Callable[[], object], returned_is_code: bool):
    """Call `main` (from finetune/__main__.py); `returned_is_code`: a console script passes the return value to
    sys.exit, `python -m` drops it."""
    armed = _outermost(sys._getframe(2)) and "coverage" not in sys.modules
    if armed:
        atexit.register(_leave)
    try:
        result = main()
    except SystemExit as stop:
        _finished(armed, stop.code)
        raise
    _finished(armed, result if returned_is_code else None)
    return result


def _outermost(caller) -> bool:
    """Whether only the process's launch is below finetune/__main__.py: runpy's two frames (`python -m`), or the one
    module-level frame of the script the process runs (the console script `finetune`, sys.argv[0])."""
    frames = []
    while caller is not None:
        frames.append(caller)
        caller = caller.f_back
    names = [frame.f_code.co_name for frame in reversed(frames)]
    if names == list(_PYTHON_M):
        return all("runpy" in frame.f_code.co_filename for frame in frames)
    return names == ["<module>"] and os.path.abspath(frames[0].f_code.co_filename) == os.path.abspath(sys.argv[0])


def _finished(armed: bool, code) -> None:
    if armed and (code is None or (isinstance(code, int) and not isinstance(code, bool))):
        _code[:] = [code or 0]


def _leave() -> None:
    if not _code:
        return
    if "logging" in sys.modules:  # its own atexit handler was registered before ours: close file handlers now
        sys.modules["logging"].shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can be written to it anyway
            pass
    os._exit(_code[0])
