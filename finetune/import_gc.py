"""Python's cyclic garbage collector paused while a command imports its libraries.

Importing torch, transformers, peft and trl creates about 550,000 objects that live as long as the process, and the
collector walks the growing heap again and again while they are made: 1.2-1.5 s of a 5-6 s start on 2 cores
(issue 26: `import finetune.train.run, trl` with and without `gc.disable()`). The process entry pauses it
(finetune/__main__.py); once the command's libraries are in (`resume`: the train task after importing the run, any
other command after importing its module), what the imports made is frozen (`gc.freeze`: never scanned again, what
CPython's docs suggest for long-lived start-up state) and the collector runs as usual from there. The few cycles the
imports leave behind (~13,000 objects) are frozen with the rest rather than spending 0.5 s finding them.
"""

from __future__ import annotations

import gc

_paused: list[bool] = []


def pause() -> None:
    """Stop the collector, if it runs, until resume()."""
    if gc.isenabled() and not _paused:
        gc.disable()
        _paused.append(True)


def resume() -> None:
    """Freeze what was made while paused and start the collector again (nothing when pause() did not stop it)."""
    if _paused:
        _paused.clear()
        gc.freeze()
        gc.enable()
