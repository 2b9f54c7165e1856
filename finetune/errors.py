"""Errors that map to the CLI's exit codes, so a scheduler can tell bad input from a crash.

| code | meaning                                                   |
|------|-----------------------------------------------------------|
| 0    | completed                                                 |
| 1    | anything else (a bug, out of memory, a library failure)   |
| 2    | config or data problem: fix the input and run again       |
| 3    | integrity problem: a file we were given is unsafe/corrupt |
"""

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2
EXIT_INTEGRITY = 3


class FinetuneError(Exception):
    """Base class: carries the exit code the CLI should end with."""

    exit_code = EXIT_FAILURE


class ConfigError(FinetuneError):
    """One or more config problems, each naming the key and the fix."""

    exit_code = EXIT_CONFIG

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        count = len(self.problems)
        header = f"{count} config problem{'s' if count != 1 else ''}:"
        super().__init__("\n".join([header, *(f"  - {p}" for p in self.problems)]))


class DataError(FinetuneError):
    """Bad training data: the message names the file, line and field."""

    exit_code = EXIT_CONFIG


class IntegrityError(FinetuneError):
    """A model, adapter or checkpoint file that is unsafe or does not match what it claims."""

    exit_code = EXIT_INTEGRITY
