"""Errors that map to the CLI's exit codes, so a scheduler can tell bad input from a crash.

| code | meaning                                                   |
|------|-----------------------------------------------------------|
| 0    | completed                                                 |
| 1    | anything else (a bug, out of memory, a library failure)   |
| 2    | config or data problem: fix the input and run again       |
| 3    | integrity problem: a file we were given is unsafe/corrupt |
| 75   | preempted (SIGTERM/SIGUSR1): a checkpoint was committed; run again with resume=true |

75 is EX_TEMPFAIL from sysexits.h: "try again later", what a scheduler should requeue.
Each error also names the `failed:<reason>` status recorded in run.json.
"""

import difflib

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2
EXIT_INTEGRITY = 3
EXIT_PREEMPTED = 75


class FinetuneError(Exception):
    """Base class: carries the exit code the CLI should end with and the reason run.json records."""

    exit_code = EXIT_FAILURE
    reason = "error"


class ConfigError(FinetuneError):
    """One or more config problems, each naming the key and the fix."""

    exit_code = EXIT_CONFIG
    reason = "config"

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        count = len(self.problems)
        header = f"{count} config problem{'s' if count != 1 else ''}:"
        super().__init__("\n".join([header, *(f"  - {p}" for p in self.problems)]))


class DataError(FinetuneError):
    """Bad training data: the message names the file, line and field."""

    exit_code = EXIT_CONFIG
    reason = "data"


class IntegrityError(FinetuneError):
    """A model, adapter or checkpoint file that is unsafe or does not match what it claims."""

    exit_code = EXIT_INTEGRITY
    reason = "integrity"


class NonFiniteError(FinetuneError):
    """A NaN/inf loss or gradient norm, or an optimizer step with no trained token: stopped before the update."""

    reason = "nonfinite"


class DiskFullError(FinetuneError):
    """No space left while saving; the previous checkpoint is intact."""

    reason = "disk_full"


class OutOfMemory(FinetuneError):
    """The accelerator (or the host) ran out of memory; the message says what to change. Committed checkpoints are
    untouched, so the run resumes once it fits."""

    reason = "oom"


class Preempted(FinetuneError):
    """Stopped by SIGTERM/SIGUSR1 after committing a checkpoint; resumable."""

    exit_code = EXIT_PREEMPTED
    reason = "preempted"


HUB_UNREACHABLE = (
    "huggingface.co",
    "offline mode",
    "HF_HUB_OFFLINE",
    "LocalEntryNotFound",
    "cannot find the requested files",
)


def hub_unreachable(err: BaseException) -> ConfigError | None:
    """The config problem behind a library error that only says the Hub could not be reached (offline, no network, a
    model never downloaded): transformers raises it as a plain OSError from deep inside from_pretrained. None for any
    other error, which keeps its traceback."""
    text = f"{type(err).__name__}: {err}"
    if not isinstance(err, OSError) or not any(marker in text for marker in HUB_UNREACHABLE):
        return None
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return ConfigError(
        f"the model files could not be read ({type(err).__name__}: {first}); give a local checkpoint folder "
        "(model.name_or_path=DIR for training and preview, base=DIR for merge/generate/evaluate), or make "
        "the Hub reachable (network, and HF_HUB_OFFLINE unset)"
    )


def closest(word: str, known, cutoff: float = 0.6, n: int = 1) -> list[str]:
    """The known names closest to a misspelled one (difflib's ratio), best first: every "did you mean" uses this."""
    return difflib.get_close_matches(str(word), [str(k) for k in known], n=n, cutoff=cutoff)


def did_you_mean(word: str, known, cutoff: float = 0.6) -> str:
    """` (did you mean 'x'?)` for the closest known name, or "" when none is close."""
    close = closest(word, known, cutoff)
    return f" (did you mean '{close[0]}'?)" if close else ""


class Problem(str):
    """A config problem's text with a kind, for code that sorts problems by what they are about rather than by their
    wording; everywhere else it is the plain message (ConfigError takes a mix of Problems and strs).

    kind "machine" (Problem.MACHINE): the problem concerns the machine the check runs on, not the config: a package
    not installed, no CUDA, where this machine would write the run. The planner turns those into notes."""

    MACHINE = "machine"

    def __new__(cls, text: str, kind: str = ""):
        problem = super().__new__(cls, text)
        problem.kind = kind
        return problem


def kind_of(problem: str) -> str:
    """A problem's kind ("" for a plain str)."""
    return getattr(problem, "kind", "")


def keeping_kinds(originals: list[str], rewritten: list[str]) -> list[str]:
    """`rewritten` (the same problems reworded one for one, e.g. redacted) with the kinds of `originals`."""
    return [Problem(new, kind_of(old)) if kind_of(old) else new for old, new in zip(originals, rewritten, strict=True)]
