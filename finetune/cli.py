"""The `finetune` command: one entry point with subcommands, in the style of git and accelerate.

`finetune conf=NAME key=value ...` (no subcommand) trains, as `python -m finetune` always did. Each subcommand is
the `main(argv)` of the module that owns it, imported only when it runs, so `finetune --help` and a mistyped
subcommand answer without importing torch or Hydra. The `python -m finetune.X` forms call the same functions.
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass

from finetune.errors import did_you_mean


@dataclass(frozen=True)
class Command:
    module: str
    summary: str
    extra: tuple[str, ...] = ()  # arguments added to the command line (chat is generate with chat=true)


COMMANDS = {
    "train": Command("finetune.train.command", "compose a config and train (the default: `finetune conf=NAME ...`)"),
    "preview": Command("finetune.data.preview", "show training samples exactly as they will train (tokenizer only)"),
    "plan": Command("finetune.plan.cli", "memory and time of a preset on a GPU, without loading the model"),
    "merge": Command("finetune.adapters.merge", "fold an adapter into its base, checked by a numerical gate"),
    "generate": Command("finetune.inference.generate", "generate from a run with its training chat template"),
    "chat": Command(
        "finetune.inference.generate", "talk to a run in the terminal (generate chat=true)", ("chat=true",)
    ),
    "evaluate": Command("finetune.evaluate.run", "base vs fine-tuned on held-out data and harness tasks"),
    "export": Command(
        "finetune.export.command", "GGUF / CTranslate2 / ONNX for local inference, checked in its runtime"
    ),
    "inspect": Command(
        "finetune.inspect.command", "attention maps of a prompt, per layer and head; base vs fine-tuned"
    ),
    "serve": Command("finetune.inference.serve", "an OpenAI-compatible HTTP server for runs, many adapters per base"),
    "embed": Command("finetune.inference.embed", "sentence vectors from a run or a base model"),
    "push": Command("finetune.adapters.push", "publish an adapter or merged model to the Hugging Face Hub"),
    "sweep": Command("finetune.train.sweep", "summarise a sweep directory into a table"),
    "report": Command("finetune.runs.report", "report.html: a run (or a sweep) on one self-contained page"),
    "checkpoints": Command("finetune.runs.checkpoints", "seal or verify a weights folder's manifest"),
    "tiny": Command("finetune.models.tiny", "build a tiny offline model of a family (tests, demos)"),
}


def main(argv: list[str] | None = None):
    try:
        return _dispatch(list(sys.argv[1:] if argv is None else argv))
    except BrokenPipeError:  # `finetune --help | head`: the reader has gone; end quietly, not with a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)


def _dispatch(args: list[str]):
    if not args or "=" in args[0] or (args[0].startswith("-") and args[0] not in ("-h", "--help")):
        return run("train", args)
    if args[0] in ("-h", "--help", "help"):
        if args[1:] and args[1] in COMMANDS:
            return run(args[1], ["--help"])
        print(help_text())
        return None
    if args[0] not in COMMANDS:
        hint = did_you_mean(args[0], COMMANDS)
        print(f"error: unknown command '{args[0]}'{hint}; `finetune --help` lists them", file=sys.stderr)
        sys.exit(2)
    return run(args[0], args[1:])


def run(name: str, args: list[str]):
    from finetune import import_gc

    command = COMMANDS[name]
    module = importlib.import_module(command.module)
    if name != "train":  # training imports its libraries later, in its task (finetune.train.command)
        import_gc.resume()
    return module.main([*args, *command.extra])


def help_text() -> str:
    from finetune.config.compose import group_options, presets

    groups = "\n".join(
        f"  {g:<12} {', '.join(group_options(g))}"
        for g in ("model", "strategy", "objective", "data", "trainer", "distributed")
    )
    width = max(map(len, COMMANDS))
    listing = "\n".join(f"  {name:<{width}}  {command.summary}" for name, command in COMMANDS.items())
    return f"""usage: finetune [COMMAND] [ARGS ...]     (python -m finetune works the same)

Fine-tune GPT-Neo, GPT-J, Pythia and GPT-NeoX with LoRA, DoRA, QLoRA or full SFT, then DPO, ORPO, KTO or SimPO.
With no arguments: the offline CPU demo (finetune train conf=demo).

commands:
{listing}

presets (finetune conf=NAME):
  {", ".join(presets())}

config groups (GROUP=OPTION):
{groups}

`finetune COMMAND --help` explains one; `finetune train --help` lists every config key.
exit codes: 0 done, 1 failure, 2 config or data problem, 3 corrupt, unsafe or mismatched input (or a failed merge
gate), 75 preempted (resume=true)."""
