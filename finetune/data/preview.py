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
