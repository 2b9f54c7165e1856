"""The documentation is executable: every command in the README, the recipes and the preset headers parses (Hydra
composition for training, the option parser for the other tools), and the CPU journeys of the legal, medical and
many-adapters recipes run end to end."""

from __future__ import annotations

import importlib
import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from finetune import console as cli
from finetune.config.compose import split_preset
from finetune.errors import ConfigError

from helpers import PROJECT

JOURNEYS = ["legal_assistant", "medical_assistant", "domain_pretraining", "many_adapters"]
TOOLS = ("merge", "generate", "evaluate", "push", "embed", "serve", "export", "inspect", "report")


def documented_commands() -> list[tuple[str, list[str]]]:
    """(where, argv) of every neo-finetune command in the docs: bash blocks of the READMEs and docs/, preset headers,
    the
    SLURM script's usage lines, and the cpu_journey.sh scripts (expanded by their dry-run mode)."""
    found = []
    for doc in [
        PROJECT / "README.md",
        *sorted((PROJECT / "docs").glob("*.md")),
        *sorted((PROJECT / "recipes").rglob("README.md")),
    ]:
        for block in re.findall(r"```bash\n(.*?)```", doc.read_text(encoding="utf-8"), re.DOTALL):
            found += _commands(doc, block.replace("\\\n", " "))
    for path in [*sorted((PROJECT / "conf").glob("*.yaml")), *sorted((PROJECT / "recipes").rglob("*.sbatch"))]:
        usage = [
            line.lstrip("#").strip()
            for line in path.read_text(encoding="utf-8").splitlines()
            if line.startswith("#   ")
        ]
        found += _commands(path, "\n".join(usage))
    for name in JOURNEYS:
        script = PROJECT / "recipes" / name / "cpu_journey.sh"
        out = subprocess.run(
            ["bash", str(script), "/tmp/run-a", "/tmp/run-b"],
            capture_output=True,
            text=True,
            env={**os.environ, "RECIPE_DRY_RUN": "1"},
            stdin=subprocess.DEVNULL,
            check=True,
        )
        found += _commands(script, out.stdout)
    return found


def _commands(where: Path, text: str) -> list[tuple[str, list[str]]]:
    commands = []
    for line in text.splitlines():
        if not re.search(
            r"python -m finetune|(^\s*|&&\s*|\|\s*|;\s*)finetune\s|accelerate launch|^\s*(bash|sbatch) recipes/", line
        ):
            continue  # prose, pip, lm_eval, ...
        words = shlex.split(line, comments=True)
        while words:  # `a && b`, `a | b`
            cut = next((i for i, w in enumerate(words) if w in ("&&", "|", ";")), len(words))
            argv, words = words[:cut], words[cut + 1 :]
            if _ours(argv):
                commands.append((f"{where.relative_to(PROJECT)}: {' '.join(argv)}", argv))
    return commands


def _ours(argv: list[str]) -> bool:
    return (
        argv[:1] == ["finetune"]
        or argv[:2] == ["python", "-m"]
        and argv[2].startswith("finetune")
        or argv[:2] == ["accelerate", "launch"]
        or argv[:1] in (["bash"], ["sbatch"])
        and argv[1:2]
        and argv[1].startswith("recipes/")
    )


def check(argv: list[str]) -> list[str]:
    """Problems with one command (empty: it parses). `finetune CMD ...`, `python -m finetune CMD ...` and the older
    `python -m finetune.CMD ...` are the same command."""
    from finetune.cli import COMMANDS
    from finetune.config.compose import preflight
    from finetune.plan import cli as plan
    from finetune.train import command as entry

    if argv[0] in ("bash", "sbatch"):
        return [] if (PROJECT / argv[1]).is_file() else [f"{argv[1]}: no such file"]
    if argv[0] == "accelerate":
        argv = ["python", *argv[argv.index("-m") :]]
    if argv[0] == "finetune":
        argv = ["python", "-m", *argv]
    module, args = argv[2], argv[3:]
    if module == "finetune" and args and args[0] in COMMANDS:
        module, args = ("finetune" if args[0] == "train" else f"finetune.{args[0]}"), args[1:]
        if module == "finetune.chat":
            module, args = "finetune.generate", [*args, "chat=true"]
    if module == "finetune":
        preset, rest = split_preset(args)
        overrides = entry._overrides(rest)
        composable = entry._first_values(overrides) if "-m" in rest else {o: o for o in overrides}
        return preflight(preset, list(composable.values()))[0]
    if module == "finetune.plan":
        try:
            preset, _, overrides = plan.parse_args(args)
        except ConfigError as err:
            return [str(err)]
        return preflight(preset or "demo", overrides)[0]
    if module == "finetune.preview":
        preset, rest = split_preset(args)
        return preflight(preset, [a for a in rest if not a.startswith(("n=", "--"))])[0]
    if module == "finetune.sweep":
        return [] if len(args) == 1 else ["finetune.sweep takes one sweep directory"]
    tool = module.removeprefix("finetune.")
    if tool not in TOOLS:
        return [f"unknown module {module}"]
    module = importlib.import_module(COMMANDS[tool].module)
    try:
        if tool == "serve":  # one or more RUNs
            module.parse(args)
        elif tool == "inspect":  # a sub-command, then the RUN
            cli.parse(args, module.OPTIONS, positional="words", many=True)
        else:
            cli.parse(args, module.OPTIONS, positional="target")
    except ConfigError as err:
        return [str(err)]
    return []


def _kind(argv: list[str]) -> str:
    """The subcommand a documented command runs, whichever spelling it uses (finetune X, python -m finetune[.X])."""
    from finetune.cli import COMMANDS

    words = argv[1:] if argv[0] == "finetune" else argv[2:] if argv[0] == "python" else []
    if not words and argv[0] != "finetune":
        return argv[0]
    if argv[0] == "python" and words[0].startswith("finetune."):
        return words[0].removeprefix("finetune.")
    words = words[1:] if argv[0] == "python" else words
    return words[0] if words and words[0] in COMMANDS else "train"


def test_every_documented_command_parses():
    commands = documented_commands()
    kinds = {_kind(argv) for _, argv in commands}
    assert len(commands) > 60 and {"train", "plan", "evaluate", "push", "merge", "accelerate", "bash"} <= kinds, kinds
    problems = [f"{where}\n    -> {'; '.join(p)}" for where, argv in commands if (p := check(argv))]
    assert not problems, "commands in the docs that do not parse:\n" + "\n".join(problems)


def test_the_check_catches_a_broken_command():
    assert check(["python", "-m", "finetune", "conf=lora_neox2b"])  # unknown preset
    assert check(["python", "-m", "finetune", "conf=demo", "data.pth=x.jsonl"])
    assert check(["python", "-m", "finetune.push", "runs/x", "repo=me/x"])
    assert check(["python", "-m", "finetune.plan", "conf=demo", "gpus=2"])
    assert check(["bash", "recipes/nope/cpu_journey.sh"])


@pytest.mark.slow
def test_cpu_journeys_legal_medical_and_many_adapters(tmp_path):
    """The recipes' CPU journeys as a user runs them: the tiny NeoX is built once into a fresh cache, each script
    trains, evaluates and stages its push, and the many-adapters script serves both adapters from one load."""
    env = {**os.environ, "NEO_FINETUNE_CACHE": str(tmp_path / "cache")}
    legal, medical = tmp_path / "legal", tmp_path / "medical"

    def journey(name: str, *args: Path) -> str:
        out = subprocess.run(
            ["bash", str(PROJECT / "recipes" / name / "cpu_journey.sh"), *map(str, args)],
            capture_output=True,
            text=True,
            env=env,
            timeout=900,
            check=False,
        )
        assert out.returncode == 0, out.stderr[-4000:]
        assert re.search(r"\[recipe\] [\d.]+ s", out.stderr)
        return out.stdout + out.stderr

    journey("legal_assistant", legal)
    record = json.loads((legal / "run.json").read_text())
    assert record["status"] == "completed" and record["data"]["train_rows"] == 144
    loss = json.loads((legal / "eval_report.json").read_text())["metrics"]["loss"]
    assert loss["finetuned"] < loss["base"]
    staged = (legal / "push_staging" / "README.md").read_text()
    assert "Caution — legal use" in staged and "your-name/neox-legal-lora" in staged and "held-out loss" in staged
    assert {p.name for p in (legal / "push_staging").iterdir()} >= {"adapter_model.safetensors", "adapter_config.json"}

    journey("medical_assistant", medical)
    assert json.loads((medical / "merged" / "merge_report.json").read_text())["gate"]["passed"]
    assert (medical / "push_staging" / "model.safetensors").is_file()
    assert "Caution — medical use" in (medical / "push_staging" / "README.md").read_text()

    out = journey("many_adapters", legal, medical)
    assert "adapters legal, medical" in out and "active adapter: medical" in out
    served = re.search(r"served: (.*)", out).group(1).split(", ")  # then one server, both adapters, the openai client
    assert {"legal", "medical"} <= set(served) and len(served) == 3  # and their base
    assert re.search(r"^legal \(\d+ tokens, (stop|length)\): ", out, re.MULTILINE)
    assert re.search(r"^medical \(\d+ tokens, (stop|length)\): ", out, re.MULTILINE)
    assert "server exited with 0" in out
