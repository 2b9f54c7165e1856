"""Keep the planner's numbers in the presets and recipes current: the `# plan (...)` lines.

Every preset in conf/ carries, in its leading comments, the planner command for its intended hardware and the
result, and recipe READMEs and scripts may carry such lines anywhere:

    # plan (python -m finetune.plan conf=lora_neox20b gpu=h100-80gb num_gpus=1 data.max_length=2048): 45.6 GiB of ...
    # plan (finetune plan conf=lora_neox20b gpu=h100-80gb num_gpus=1 data.max_length=2048): 45.6 GiB of ...

This script re-plans each command and rewrites the lines whose result changed (a developer tool: run it after
changing the memory model, a preset or the GPU table, and commit the result). tests/test_plan.py fails while any
line is stale or a preset has none.

    python benchmarks/sync_plan_headers.py            rewrite stale lines, print each one rewritten
    python benchmarks/sync_plan_headers.py --check    print stale or missing lines, exit 1 if there are any
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
COMMAND = "python benchmarks/sync_plan_headers.py"
# either spelling of the command; a rewritten line keeps its own
HEADER = re.compile(r"^# plan \((?P<command>python -m finetune\.plan|finetune plan) (?P<args>[^)]*)\): (?P<result>.*)$")


def conf_dir() -> Path:
    from finetune.config.compose import CONF_DIR

    return CONF_DIR


def preset_files() -> list[Path]:
    return sorted(p for p in conf_dir().glob("*.yaml") if p.stem != "config")


def recipe_files() -> list[Path]:
    """Recipe READMEs and scripts: their `# plan (...)` lines (anywhere, any preset) are kept in sync too."""
    recipes = conf_dir().parent / "recipes"
    return sorted(p for p in recipes.rglob("*") if p.suffix in (".md", ".sbatch", ".sh"))


def header_line(path: Path) -> tuple[int, re.Match] | None:
    """(index, match) of the `# plan (...)` line in the leading comment block of a preset."""
    for index, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if not line.startswith("#"):
            return None
        found = HEADER.match(line)
        if found:
            return index, found
    return None


def expected_header(args: str, command: str = "python -m finetune.plan") -> str:
    """The header line a preset should carry for the planner command in it."""
    from finetune.plan.cli import parse_args
    from finetune.plan.planning import plan_preset
    from finetune.plan.render import summary

    preset, options, overrides = parse_args(args.split())
    result = plan_preset(preset, overrides, **options)
    return f"# plan ({command} {args}): {summary(result)}"


def sync_headers(write: bool) -> list[str]:
    """Recompute every preset's header line and every plan line of the recipes; rewrite stale ones when `write`.
    Returns one message per stale or missing line (after writing: per rewritten line)."""
    messages, lines_of = [], {}
    for path in preset_files():
        found = header_line(path)
        if found is None:
            messages.append(
                f"{path.name}: no `# plan (python -m finetune.plan conf={path.stem} gpu=... num_gpus=...)` line "
                f"in its leading comments; add one, then run {COMMAND}"
            )
        elif f"conf={path.stem}" not in found[1].group("args").split():
            messages.append(f"{path.name}: its plan line must name conf={path.stem}")
        else:
            lines_of[path] = [found]
    for path in recipe_files():
        found = [
            (i, m) for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()) if (m := HEADER.match(line))
        ]
        if found:
            lines_of[path] = found
    for path, found in lines_of.items():
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        stale = 0
        for index, match in found:
            wanted = expected_header(match.group("args"), match.group("command"))
            if lines[index].rstrip("\n") != wanted:
                messages.append(
                    f"{path.relative_to(conf_dir().parent)}:{index + 1}: {'rewrote' if write else 'stale'}: {wanted}"
                )
                lines[index] = wanted + "\n"
                stale += 1
        if write and stale:
            path.write_text("".join(lines), encoding="utf-8")
    return messages


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="list stale or missing lines and exit 1; rewrite nothing")
    args = parser.parse_args(argv)
    from finetune.errors import FinetuneError

    try:
        messages = sync_headers(write=not args.check)
    except FinetuneError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    for message in messages:
        print(message)
    return 1 if messages and args.check else 0


if __name__ == "__main__":
    sys.path.insert(0, str(PROJECT))  # this checkout's finetune/, whatever is installed
    sys.exit(main())
