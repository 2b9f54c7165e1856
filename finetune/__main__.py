"""`python -m finetune ...` and the `finetune` console script (`command`): finetune.cli, with the garbage collector
paused while the command imports its libraries (finetune.import_gc) and ended without the interpreter's teardown
once it has finished (finetune.fast_exit). `main` is the plain CLI, for callers that stay in their own process
(tests)."""

from finetune import fast_exit, import_gc
from finetune.cli import main


def command():
    """The console script's entry (its wrapper exits with what this returns)."""
    import_gc.pause()
    return fast_exit.run(main, returned_is_code=True)


if __name__ == "__main__":
    import_gc.pause()
    fast_exit.run(main, returned_is_code=False)
