"""`key=value` arguments for the tools around a run (merge, generate, push), in the same style as training's overrides.

Each tool declares its options once (name, type, default, help); the parser turns argv into typed values, prints
`--help` from the same declarations, and reports every unknown or mistyped argument at once with a suggestion and
exit code 2, as training does for its config. Cheap to import: no torch, no Hydra.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from finetune.errors import ConfigError, FinetuneError, did_you_mean, hub_unreachable

TRUE, FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


@dataclass(frozen=True)
class Option:
    name: str
    type: type  # str, int, float, bool or list (comma-separated, or [a,b])
    default: Any
    help: str


def parse(argv: list[str], options: list[Option], positional: str | None = None, many: bool = False) -> dict:
    """Typed values for every option (defaults filled in); the positional argument under its name (with many=True:
    one or more positional arguments, as a list).

    Raises ConfigError naming each bad argument and the fix.
    """
    known = {o.name: o for o in options}
    values = {o.name: o.default for o in options}
    problems, given_positional = [], []
    for arg in argv:
        key, sep, raw = arg.partition("=")
        if not sep:
            given_positional.append(arg)
            continue
        option = known.get(key)
        if option is None:
            hint = did_you_mean(key, known) or f"; options: {', '.join(known)}"
            problems.append(f"unknown option '{arg}'{hint}")
            continue
        if option.default is None and raw.lower() in ("null", "none"):
            values[key] = None  # an optional value set back to "not given"
            continue
        try:
            values[key] = _convert(raw, option.type)
        except ValueError as err:
            problems.append(f"{key}={raw}: {err}")
    if positional is not None and many:
        if given_positional:
            values[positional] = given_positional
        else:
            problems.append(f"expected one or more {positional} before the key=value options (none given)")
    elif positional is not None:
        if len(given_positional) != 1:
            found = f"got {given_positional}" if given_positional else "none given"
            problems.append(f"expected exactly one {positional} before the key=value options ({found})")
        else:
            values[positional] = given_positional[0]
    elif given_positional:
        problems.append(f"unexpected argument(s) {given_positional}: options are key=value")
    if problems:
        raise ConfigError(problems)
    return values


def _convert(raw: str, kind: type):
    if kind is bool:
        if raw.lower() in TRUE:
            return True
        if raw.lower() in FALSE:
            return False
        raise ValueError("expected true or false")
    if kind is list:
        raw = raw.strip()
        if raw.startswith("[") and raw.endswith("]"):
            raw = raw[1:-1]
        return [part.strip() for part in raw.split(",") if part.strip()]
    if kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            raise ValueError(f"expected {'an integer' if kind is int else 'a number'}") from None
    if raw.lower() in ("null", "none", ""):
        return None
    return raw


def usage(doc: str, options: list[Option]) -> str:
    """The tool's docstring, then one line per option with its default."""
    lines = [doc.strip(), "", "options:"]
    for option in options:
        default = option.default if option.type is not list else ",".join(option.default or []) or "[]"
        lines.append(f"  {option.name + '=' + str(default):<24} {option.help}")
    lines.append("")
    lines.append("exit codes: 0 done, 1 failure, 2 bad argument or config, 3 unsafe or mismatched input.")
    return "\n".join(lines)


def main(
    run: Callable[[dict], Any],
    doc: str,
    options: list[Option],
    positional: str | None,
    argv: list[str] | None = None,
    many: bool = False,
):
    """Parse argv (or sys.argv), print help on -h/--help, run, and exit with the error's code on failure."""
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help", "help") for a in args):
        print(usage(doc, options))
        return None
    return exiting_on_errors(lambda: run(parse(args, options, positional, many)))


def exiting_on_errors(work: Callable[[], Any]):
    """work(), or exit with the error's code and its message: our errors, and the Hub out of reach deep inside
    transformers (a config problem with the fix, not a traceback); any other error keeps its traceback."""
    try:
        return work()
    except FinetuneError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except OSError as err:
        problem = hub_unreachable(err)
        if problem is None:
            raise
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(problem.exit_code)


def say(message: str) -> None:
    """One line of ours on stderr (stdout stays for a tool's result: generated text, file lists).

    Rank 0 only in a distributed launch: the other ranks would repeat every line (errors still reach stderr on every
    rank, through the CLI's error path)."""
    from finetune import ranks

    if ranks.is_main():
        print(f"[finetune] {message}", file=sys.stderr, flush=True)
        transcript(f"[finetune] {message}")


class _Transcript:
    """The run's own lines, also written to its log file (train.log) for post-mortems: what `say`, the step lines and
    the final error printed, each with a timestamp. Lines said before the file is known (validation, precision) wait
    in memory and are written when `log_to` opens it; a run that writes nothing (a completed run resumed) never
    opens it, so its log stays untouched."""

    def __init__(self):
        self.pending: list[str] = []
        self.file = None

    def add(self, line: str) -> None:
        import time

        stamped = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {line}"
        if self.file is None:
            self.pending.append(stamped)
        else:
            self.file.write(stamped + "\n")
            self.file.flush()


_TRANSCRIPT = _Transcript()


def transcript(text: str) -> None:
    """Add lines to the run's log file (see _Transcript); printing them is the caller's business."""
    for line in text.splitlines() or [""]:
        _TRANSCRIPT.add(line)


def new_transcript() -> None:
    """Forget lines said by an earlier run in this process (a sweep's jobs, tests) that never opened a log."""
    close_log()
    _TRANSCRIPT.pending.clear()


def log_to(path) -> None:
    """From now on, this process's lines also go to `path` (appended), starting with those said so far."""
    close_log()
    _TRANSCRIPT.file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - held for the run, closed by close_log
    for line in _TRANSCRIPT.pending:
        _TRANSCRIPT.file.write(line + "\n")
    _TRANSCRIPT.pending.clear()
    _TRANSCRIPT.file.flush()


def close_log() -> None:
    if _TRANSCRIPT.file is not None:
        _TRANSCRIPT.file.close()
        _TRANSCRIPT.file = None


def quiet_libraries() -> None:
    """Our own lines, not a wall of library deprecation notices and weight-loading bars (the training bar and log lines
    are ours: finetune.progress). Only notices that say nothing to the person running the job are dropped:
    - the logged notices of `finetune.LIBRARY_NOTICES` (filters installed when `finetune` is imported, before the
      libraries are: some log at import);
    - torch.distributed's FutureWarnings about its own deprecated collectives, called by DeepSpeed, not by us."""
    import warnings

    import transformers

    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\.")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed\.c10d_logger")
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
