"""`python -m finetune.preview [conf=PRESET] [n=5] [key=value ...]`: the first n training samples exactly as they
will be trained, trained tokens shown apart from masked ones, plus the row accounting and length statistics.

Loads the tokenizer only, never the model weights, so it answers in seconds for any preset (a tiny demo
checkpoint is built on first use). Exit codes as for training: 2 for a config or data problem.
"""

from __future__ import annotations

import os
import sys

TRAINED_OPEN, TRAINED_CLOSE = "[[", "]]"
GREEN, DIM, RESET = "\033[32m", "\033[2m", "\033[0m"


def main(argv: list[str] | None = None) -> None:
    from finetune.config.compose import split_preset

    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help", "help") for a in args):
        print(
            __doc__.strip()
            + "\n\noptions: n=N (samples shown, default 5), --color / --no-color (default: color on a terminal)"
        )
        return
    color = sys.stdout.isatty() and "NO_COLOR" not in os.environ
    n, overrides = 5, []
    config_name, args = split_preset(args)
    for arg in args:
        if arg in ("--color", "--no-color"):
            color = arg == "--color"
        elif arg.startswith("n="):
            n = int(arg[2:])
        else:
            overrides.append(arg)
    from finetune import console as cli

    cli.quiet_libraries()  # building a tiny checkpoint on first use would otherwise print library notices and bars
    cli.exiting_on_errors(lambda: print(preview(config_name, overrides, n, color)))


def preview(config_name: str, overrides: list[str], n: int = 5, color: bool = False) -> str:
    """The preview text for a preset and overrides (raises ConfigError / DataError like training would)."""
    from finetune.config.compose import compose, preflight, to_container
    from finetune.config.schema import RunConfig
    from finetune.config.validate import check_data, check_schema
    from finetune.data import templates as data_templates
    from finetune.data.tokenize import describe, prepare
    from finetune.errors import ConfigError
    from finetune.models import load as models

    problems, accepted = preflight(config_name, overrides)
    if problems:
        raise ConfigError(problems)
    cfg = compose(config_name, [accepted.get(o, o) for o in overrides])
    resolved = to_container(cfg)
    problems = check_schema(resolved, RunConfig, "")
    problems += [] if problems else check_data(resolved["data"])
    if problems:
        raise ConfigError(problems)
    _quiet()
    models.ensure_available(cfg.model)
    tokenizer = models.load_tokenizer(cfg.model)
    template = data_templates.load(cfg.data.template)
    objective = (cfg.get("objective") or {}).get("name", "sft")
    if objective != "sft":
        return _preference_preview(cfg, tokenizer, template, objective, n, color)
    data = prepare(
        cfg.data, tokenizer, template, cfg.seed, batch_size=cfg.trainer.get("per_device_train_batch_size", 8)
    )

    legend = (
        f"{GREEN}trained{RESET} {DIM}masked{RESET}"
        if color
        else f"text inside {TRAINED_OPEN} {TRAINED_CLOSE} is trained; the rest is masked"
    )
    out = [f"template {template.name} ({template.path}); {legend}"]
    for sample in data.train[:n]:
        out += [
            "",
            f"--- {sample.where}: {len(sample.input_ids)} tokens, {sample.trained} trained",
            show(sample, tokenizer, color),
        ]
    out.append("")
    out += describe(data)
    return "\n".join(out)


COLUMN = 58  # characters per side of a chosen | rejected pair


def _preference_preview(cfg, tokenizer, template, objective: str, n: int, color: bool) -> str:
    """Preference rows as they will train: the prompt once (masked), then the two completions side by side, each
    wholly trained (EOS included); KTO rows: the completion with its label."""
    from finetune.config.schema import UNPAIRED_OBJECTIVES
    from finetune.data.preference import describe_preferences, prepare_preferences

    kind = "unpaired" if objective in UNPAIRED_OBJECTIVES else "paired"
    data = prepare_preferences(cfg.data, tokenizer, template, cfg.seed, kind)
    mark = (lambda text: f"{GREEN}{text}{RESET}") if color else (lambda text: f"{TRAINED_OPEN}{text}{TRAINED_CLOSE}")
    out = [f"objective {objective}, template {template.name} ({template.path}); the prompt is masked, answers trained"]
    for row in data.train[:n]:
        prompt = tokenizer.decode(row.prompt_ids)
        out += [
            "",
            f"--- {row.where}: prompt {len(row.prompt_ids)} tokens",
            f"{DIM}{prompt}{RESET}" if color else prompt,
        ]
        if kind == "paired":
            sides = [(f"chosen ({len(row.chosen_ids)} tokens)", row.chosen_ids)]
            sides.append((f"rejected ({len(row.rejected_ids)} tokens)", row.rejected_ids))
        else:
            label = "desirable" if row.label else "undesirable"
            sides = [(f"{label} completion ({len(row.completion_ids)} tokens)", row.completion_ids)]
        out += _columns(
            [(title, f"{TRAINED_OPEN}{tokenizer.decode(ids)}{TRAINED_CLOSE}") for title, ids in sides], color, mark
        )
    out.append("")
    out += describe_preferences(data)
    return "\n".join(out)


def _columns(sides: list[tuple[str, str]], color: bool, mark) -> list[str]:
    """Texts side by side, wrapped to COLUMN characters each (the markers wrap with the text; colour applied after)."""
    import textwrap

    wrapped = [[title.ljust(COLUMN)] + textwrap.wrap(text.replace("\n", " ⏎ "), COLUMN) for title, text in sides]
    lines = []
    for row in range(max(map(len, wrapped))):
        cells = [(column[row] if row < len(column) else "").ljust(COLUMN) for column in wrapped]
        if color:
            cells = [c.replace(TRAINED_OPEN, GREEN).replace(TRAINED_CLOSE, RESET) for c in cells]
        lines.append(" | ".join(cells).rstrip())
    return lines


def show(sample, tokenizer, color: bool) -> str:
    """The sample's text with trained runs marked; runs are decoded whole so multi-byte characters survive."""
    from finetune.data.tokenize import IGNORE_INDEX

    parts, start = [], 0
    for end in range(1, len(sample.input_ids) + 1):
        if end == len(sample.input_ids) or (sample.labels[end] == IGNORE_INDEX) != (
            sample.labels[start] == IGNORE_INDEX
        ):
            text = tokenizer.decode(sample.input_ids[start:end])
            trained = sample.labels[start] != IGNORE_INDEX
            if color:
                parts.append(f"{GREEN if trained else DIM}{text}{RESET}")
            else:
                parts.append(f"{TRAINED_OPEN}{text}{TRAINED_CLOSE}" if trained else text)
            start = end
    return "".join(parts)


def _quiet() -> None:
    import transformers

    transformers.logging.set_verbosity_error()


if __name__ == "__main__":
    main()
