"""`python -m finetune [conf=PRESET] [key=value ...] [hydra flags]`: compose a config and train.

The shim does three things Hydra does not: maps `conf=NAME` to Hydra's config name, prints a fast `--help` (every
config key with its doc) without importing torch, and checks every command-line override before Hydra runs, so that
all misspelled keys are reported at once with a suggestion and exit code 2 (Hydra stops at the first, with 1).
Nothing heavy is imported until training really starts (finetune.train).
"""

from __future__ import annotations

import sys

# Hydra flags that take a separate value (`--cfg job`): the value is not an override.
_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--config-dir", "-cd", "--config-path", "-cp", "-sc"}


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help", "help") for a in args):
        print(_help_text(args))
        return
    from finetune.config.compose import preflight, split_preset

    config_name, args = split_preset(args)
    overrides = _overrides(args)
    multirun = any(a in ("-m", "--multirun") for a in args)
    # A sweep (key=a,b) is checked with the first value of each swept key; every job is validated again when it runs.
    composable = _first_values(overrides) if multirun else dict(zip(overrides, overrides))
    problems, accepted = preflight(config_name, list(composable.values()))
    if problems:
        from finetune.config.validate import unknown_library_keys
        from finetune.errors import EXIT_CONFIG, ConfigError

        problems += unknown_library_keys(
            [o.split("=", 1)[0] for o in overrides if o.startswith(("trainer.", "strategy."))]
        )

        print(f"error: {ConfigError(problems)}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    if multirun:
        _validate_first_job(config_name, [accepted.get(o, o) for o in composable.values()])
    elif not any(a.split("=")[0] in HYDRA_PRINT_ONLY for a in args):  # before Hydra opens train.log in output_dir: a
        from finetune.runs.runlock import before_start  # run refused for its output_dir writes nothing there

        refused = before_start(config_name, [accepted.get(o, o) for o in composable.values()])
        if refused:
            from finetune.errors import EXIT_CONFIG, ConfigError

            print(f"error: {ConfigError(refused)}", file=sys.stderr)
            sys.exit(EXIT_CONFIG)
    args = [_as_taken(a, accepted.get(composable.get(a, a), a)) for a in args]
    if multirun:
        args = _sweep_directories(args)
    _run_hydra(config_name, args)
    if multirun and _SWEEP_EXIT_CODES:
        sys.exit(max(_SWEEP_EXIT_CODES))


HYDRA_PRINT_ONLY = ("--cfg", "-c", "--info", "-i", "--hydra-help", "--shell-completion", "-sc")  # no run, no train.log


def _first_values(overrides: list[str]) -> dict[str, str]:
    """Each override with a sweep (`strategy.r=8,16`, `range(..)`, `choice(..)`, `interval(..)`) replaced by its first
    value, so that the sweep's keys and group options can be checked before any job starts."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    first = {}
    for text in overrides:
        try:
            override = OverridesParser.create().parse_overrides([text])[0]
        except HydraException:
            first[text] = text  # Hydra reports the syntax error itself
            continue
        if not override.is_sweep_override():
            first[text] = text
        elif override.is_interval_sweep():
            first[text] = f"{override.get_key_element()}={override.value().start}"
        else:
            first[text] = f"{override.get_key_element()}={next(iter(override.sweep_string_iterator()))}"
    return first


def _validate_first_job(config_name: str, overrides: list[str]) -> None:
    """A sweep's first job validated in full (keys of trl and peft, data files, templates) before any job starts: a
    misspelled key should cost seconds, not one failed job per combination."""
    import tempfile

    from finetune.config.compose import compose
    from finetune.config.validate import validate
    from finetune.errors import EXIT_CONFIG, ConfigError

    with tempfile.TemporaryDirectory() as scratch:  # not the sweep's directory: nothing is written before the jobs
        try:
            validate(compose(config_name, [*overrides, f"output_dir={scratch}/job"]))
        except ConfigError as err:
            print(f"error: the sweep's first job: {err}", file=sys.stderr)
            sys.exit(EXIT_CONFIG)


def _as_taken(original: str, taken: str) -> str:
    """The original override with the prefix Hydra needed for it (`++trainer.warmup_ratio=0.1,0.2`)."""
    prefix = taken[: len(taken) - len(taken.lstrip("+~"))]
    return prefix + original.lstrip("+~") if prefix and not original.startswith(("+", "~")) else original


def _sweep_directories(args: list[str]) -> list[str]:
    """In a sweep, `output_dir=DIR` names the sweep's directory (default runs/sweeps/PRESET/TIME) and each job trains
    in DIR/<job number>/, a run directory of its own."""
    rest, sweep_dir = [], None
    for arg in args:
        if arg.startswith("output_dir="):
            sweep_dir = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    if sweep_dir is not None:
        rest.append(f"hydra.sweep.dir={sweep_dir}")
    return [*rest, "output_dir=${hydra:sweep.dir}/${hydra:sweep.subdir}"]


_SWEEP_EXIT_CODES: list[int] = []  # exit codes of the failed jobs of a sweep: the sweep exits with the worst


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


def _run_hydra(config_name: str, args: list[str]) -> None:
    import hydra

    from finetune.config.compose import CONF_DIR, register_resolvers

    register_resolvers()
    from finetune import ranks

    if not ranks.is_main() and not any(a.startswith(("hydra/job_logging=", "hydra.job_logging")) for a in args):
        args = [*args, "hydra/job_logging=stdout"]  # train.log in the shared run directory is rank 0's alone
    sys.argv = [sys.argv[0], *args]
    hydra.main(version_base=None, config_path=str(CONF_DIR), config_name=config_name)(_task)()


def _task(cfg) -> float | None:
    """One run. In a sweep, a failed job is reported and recorded (its run.json) and the sweep goes on; the job
    returns its objective (finetune.sweep.objective) for sweepers that optimise, such as Optuna."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from finetune import import_gc
    from finetune.errors import EXIT_FAILURE, FinetuneError
    from finetune.train.run import run

    import_gc.resume()  # torch, transformers, peft and trl are in
    in_sweep = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        run_dir = run(cfg)
    except FinetuneError as err:
        print(f"error: {err}", file=sys.stderr)
        if not in_sweep:
            sys.exit(err.exit_code)
        _SWEEP_EXIT_CODES.append(err.exit_code)
        _record_refused_job(cfg, err)
        return float("nan")
    except Exception as err:  # a bug or out of memory in one job of a sweep: the others still run
        if not in_sweep:
            raise
        import traceback

        traceback.print_exc()
        print(f"error: job {HydraConfig.get().job.num} failed: {type(err).__name__}: {err}", file=sys.stderr)
        _SWEEP_EXIT_CODES.append(EXIT_FAILURE)
        return float("nan")
    if not in_sweep:
        return None
    import json

    from finetune.train.sweep import objective

    return objective(json.loads((run_dir / "run.json").read_text(encoding="utf-8")))


def _record_refused_job(cfg, err) -> None:
    """A job refused before it started (a config error) has no run.json yet: write one, so the sweep's table lists
    it."""
    from pathlib import Path

    from finetune.runs import artifacts
    from finetune.runs.runlock import safe_to_record_in
    from finetune.train.run import given_overrides

    run_dir = Path(str(cfg.output_dir))
    if not (run_dir / "run.json").exists() and safe_to_record_in(run_dir):  # never among files no run wrote
        run_dir.mkdir(parents=True, exist_ok=True)
        artifacts.write_json(
            run_dir / "run.json",
            {
                "status": f"failed:{err.reason}",
                "exit_code": err.exit_code,
                "error": str(err),
                "overrides": given_overrides(),
            },
        )


def _help_text(args: list[str] = ()) -> str:
    """Usage, presets, groups, examples and exit codes, then every config key with its doc (finetune.config.keys):
    `--help conf=NAME` shows that preset's values, `--help all` adds every field of trl.SFTConfig and peft.LoraConfig.
    Reads files only (schema.py, conf/, trl's and peft's sources with ast): no torch, about a second."""
    from finetune.config.compose import group_options, presets, split_preset
    from finetune.config.keys import listing

    preset, _ = split_preset(list(args))
    groups = "\n".join(
        f"  {g:<12} {', '.join(group_options(g))}" for g in ("model", "strategy", "data", "trainer", "distributed")
    )
    return f"""usage: finetune [train] [conf=PRESET] [key=value ...] [--cfg job] [-m]    (or python -m finetune ...)

Fine-tune GPT-Neo, GPT-J, Pythia and GPT-NeoX with LoRA, DoRA, QLoRA or full SFT: compose a preset with your
overrides and train. With no arguments: the offline CPU demo (conf=demo).

presets (conf=NAME):
  {", ".join(presets())}

config groups (GROUP=OPTION):
{groups}

examples:
  finetune                                        offline demo on CPU
  finetune conf=lora_neox20b --cfg job            print the resolved config, load nothing
  finetune conf=lora_pythia1b data.path=my.jsonl strategy.r=32 trainer.learning_rate=1e-4
  finetune conf=lora_neox20b model.name_or_path=/models/neox20b output_dir=runs/legal
  finetune preview data=chatml data.path=chats.jsonl n=3     samples as they will train (tokenizer only)
  finetune plan conf=lora_neox20b gpu=h100-80gb              memory and time on a GPU, no weights loaded

after training (each takes --help):
  finetune merge RUN_DIR [dtype=bfloat16]              streaming merge + numerical gate -> RUN_DIR/merged
  finetune generate RUN_DIR prompt="..."               generate with the training chat template
  finetune chat RUN_DIR                                talk to it in the terminal (generate chat=true)
  finetune evaluate RUN_DIR [data=FILE] [harness=lambada_openai,sciq]   base vs fine-tuned -> eval_report.md/json/png
  finetune embed RUN_DIR input=texts.txt [pooling=mean|last] [adapter=false]   vectors -> RUN_DIR/embeddings/
  finetune push RUN_DIR repo_id=NAME/REPO [merged=true] [dry_run=true]
  finetune report RUN_DIR                              report.html: the run on one offline page (training writes it)

exit codes: 0 done, 1 failure, 2 config or data problem, 3 corrupt, unsafe or mismatched input (or a failed merge gate),
75 preempted (resume=true).
sweeps: finetune conf=demo -m strategy.r=8,16,32 trainer.learning_rate=1e-4,3e-4
  each job in runs/sweeps/PRESET/TIME/N/ (output_dir=DIR: DIR/N/), table in sweep_summary.md (finetune sweep DIR);
  exit code: the worst job's. finetune report DIR: the jobs compared on one page.
Hydra's own flags: --cfg job|all, --resolve, -m (multirun), --hydra-help.

{listing(preset, everything="all" in args)}"""
