"""`python -m finetune [conf=PRESET] [key=value ...] [hydra flags]`: compose a config and train.

The shim does three things Hydra does not: maps `conf=NAME` to Hydra's config name, prints a fast `--help`
without importing Hydra or torch, and checks every command-line override before Hydra runs, so that all
misspelled keys are reported at once with a suggestion and exit code 2 (Hydra stops at the first, with 1).
Nothing heavy is imported until training really starts (finetune.train).
"""

from __future__ import annotations

import difflib
import sys

# Hydra flags that take a separate value (`--cfg job`): the value is not an override.
_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--config-dir", "-cd", "--config-path", "-cp", "-sc"}


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help", "help") for a in args):
        print(_help_text())
        return
    config_name, args = _pop_preset(args)
    overrides = _overrides(args)
    multirun = any(a in ("-m", "--multirun") for a in args)
    if not multirun:  # sweeps (a=1,2) are not composable in one go; each job is validated when it runs
        problems, accepted = preflight(config_name, overrides)
        if problems:
            from finetune.errors import EXIT_CONFIG, ConfigError
            from finetune.validate import unknown_library_keys

            problems += unknown_library_keys([o.split("=", 1)[0] for o in overrides if o.startswith(("trainer.", "strategy."))])

            print(f"error: {ConfigError(problems)}", file=sys.stderr)
            sys.exit(EXIT_CONFIG)
        args = [accepted.get(a, a) for a in args]
    _run_hydra(config_name, args)


def _pop_preset(args: list[str]) -> tuple[str, list[str]]:
    from finetune.config import DEFAULT_PRESET

    name, rest = DEFAULT_PRESET, []
    for arg in args:
        if arg.startswith("conf="):
            name = arg.split("=", 1)[1].removesuffix(".yaml")
        else:
            rest.append(arg)
    return name, rest


def _overrides(args: list[str]) -> list[str]:
    overrides, skip_next = [], False
    for arg in args:
        if skip_next:
            skip_next = False
        elif arg in _FLAGS_WITH_VALUE:
            skip_next = True
        elif not arg.startswith("-") and "=" in arg:
            overrides.append(arg)
    return overrides


def preflight(config_name: str, overrides: list[str]) -> tuple[list[str], dict[str, str]]:
    """Compose once. Return one message per unknown preset, group option or key (empty when all is well),
    and how each override was finally taken (`trainer.max_steps=5` becomes `++trainer.max_steps=5`)."""
    from hydra.errors import ConfigCompositionException, MissingConfigException

    from finetune.config import compose_with_overrides, presets

    if config_name not in presets():
        return [_unknown("preset", f"conf={config_name}", config_name, presets(), "conf=NAME")], {}
    problems, remaining = [], list(overrides)
    for _ in range(len(overrides) + 1):
        try:
            _, taken = compose_with_overrides(config_name, remaining)
            return problems, dict(zip(remaining, taken))
        except (ConfigCompositionException, MissingConfigException) as err:
            bad = _blame(err, remaining)
            if bad is None:
                return [*problems, str(err).strip()], {}
            problems.append(_explain(bad, config_name))
            remaining.remove(bad)
    return problems, {}


def _blame(err: Exception, overrides: list[str]) -> str | None:
    """The override an error is about (Hydra names the key or the group option in its message)."""
    text = str(err)
    for override in overrides:
        key, value = override.split("=", 1)
        key = key.lstrip("+~")
        if f"'{key}'" in text or f"'{key}/{value}'" in text or f"{key}={value}" in text:
            return override
    return None


def _explain(override: str, config_name: str) -> str:
    from finetune.config import CONF_DIR, compose, group_options

    key, value = override.split("=", 1)
    key = key.lstrip("+~")
    if (CONF_DIR / key).is_dir():  # a group selection such as model=gpt_neox_2b
        return _unknown(f"'{key}' option", override, value, group_options(key), f"{key}=NAME")
    parent, _, leaf = key.rpartition(".")
    node = compose(config_name, [])
    for part in filter(None, parent.split(".")):
        node = node.get(part) if hasattr(node, "get") else None
    known = list(node.keys()) if hasattr(node, "keys") else []
    return f"unknown key '{key}' in command-line override '{override}'{_suggest(leaf, known)}"


def _suggest(word: str, known: list[str]) -> str:
    close = difflib.get_close_matches(word, [str(k) for k in known], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _unknown(what: str, given: str, name: str, known: list[str], form: str) -> str:
    hint = _suggest(name, known)
    return f"unknown {what} in '{given}'{hint}; choose one of: {', '.join(known)} ({form})"


def _run_hydra(config_name: str, args: list[str]) -> None:
    import hydra

    from finetune.config import CONF_DIR, register_resolvers

    register_resolvers()
    from finetune import ranks

    if not ranks.is_main() and not any(a.startswith(("hydra/job_logging=", "hydra.job_logging")) for a in args):
        args = [*args, "hydra/job_logging=stdout"]  # train.log in the shared run directory is rank 0's alone
    sys.argv = [sys.argv[0], *args]
    hydra.main(version_base=None, config_path=str(CONF_DIR), config_name=config_name)(_task)()


def _task(cfg) -> None:
    from finetune.errors import FinetuneError
    from finetune.train import run

    try:
        run(cfg)
    except FinetuneError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)


def _help_text() -> str:
    from finetune.config import group_options, presets

    groups = "\n".join(f"  {g:<12} {', '.join(group_options(g))}" for g in ("model", "strategy", "data", "trainer", "distributed"))
    return f"""usage: python -m finetune [conf=PRESET] [key=value ...] [--cfg job] [-m]

Fine-tune GPT-Neo, GPT-J, Pythia and GPT-NeoX with LoRA, DoRA, QLoRA or full SFT.
With no arguments: the offline CPU demo (conf=demo).

presets (conf=NAME):
  {', '.join(presets())}

config groups (GROUP=OPTION):
{groups}

examples:
  python -m finetune                                   offline demo on CPU
  python -m finetune conf=lora_neox20b --cfg job       print the resolved config, load nothing
  python -m finetune conf=lora_pythia1b data.path=my.jsonl strategy.r=32 trainer.learning_rate=1e-4
  python -m finetune conf=lora_neox20b model.name_or_path=/models/neox20b output_dir=runs/legal
  python -m finetune.preview data=chatml data.path=chats.jsonl n=3    samples as they will train (tokenizer only)

after training (each takes --help):
  python -m finetune.merge RUN_DIR [dtype=bfloat16]            streaming merge + numerical gate -> RUN_DIR/merged
  python -m finetune.generate RUN_DIR prompt="..." | chat=true  generate with the training chat template
  python -m finetune.evaluate RUN_DIR [data=FILE] [harness=lambada_openai,sciq]   base vs fine-tuned -> eval_report.md/json/png
  python -m finetune.embed RUN_DIR input=texts.txt [pooling=mean|last] [adapter=false]   vectors -> RUN_DIR/embeddings/
  python -m finetune.push RUN_DIR repo_id=NAME/REPO [merged=true] [dry_run=true]

exit codes: 0 done, 1 failure, 2 config or data problem, 3 corrupt, unsafe or mismatched input (or a failed merge gate),
75 preempted (resume=true).
Hydra's own flags: --cfg job|all, --resolve, -m (multirun), --hydra-help."""


if __name__ == "__main__":
    main()
