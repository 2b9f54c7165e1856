"""Every config problem at once, before any weights are touched.

Our own keys are checked against the dataclasses in finetune.config; `trainer:` against trl.SFTConfig's fields
and `strategy:` against peft.LoraConfig's, so a misspelled key anywhere fails with a suggestion instead of being
silently ignored. Architecture checks (LoRA targets, sequence length) run on the meta device from config.json.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import types
import typing
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from finetune import ranks
from finetune.config import credentials
from finetune.config.model_checks import check_model
from finetune.config.objective_checks import check_objective
from finetune.config.schema import STRATEGIES, RunConfig
from finetune.errors import ConfigError, Problem, did_you_mean, keeping_kinds
from finetune.runs import runlock

CARD_DOMAINS = ("general", "legal", "medical")
BACKENDS = ("none", "ddp", "deepspeed", "fsdp")  # conf/distributed/: how the launched processes share the work

# trainer keys that another part of our config owns: key -> where to set it instead
OWNED_TRAINER_KEYS = {
    "output_dir": "output_dir=PATH",
    "seed": "seed=N",
    "data_seed": "seed=N",
    "max_length": "data.max_length=N",
    "packing": "data.packing=true (best-fit rows whose samples cannot see each other; trl's packing breaks GPT-Neo)",
    "padding_free": "data.packing=true (trl's padding-free rows exceed GPT-Neo's positions)",
    "dataset_text_field": "data.template=NAME",
    "completion_only_loss": "data.template=NAME (the template decides which tokens are trained)",
    "assistant_only_loss": "data.template=NAME (the template decides which tokens are trained)",
    "dataset_kwargs": "data.*",
    "deepspeed": "distributed=zero2|zero3|zero3_offload (conf/distributed/)",
    "fsdp": "distributed=fsdp (conf/distributed/fsdp.yaml)",
    "fsdp_config": "distributed=fsdp (distributed.fsdp_config.*)",
    "logging_nan_inf_filter": "no key (losses are always logged raw, and a non-finite loss stops the run)",
    "hub_token": "the HF_TOKEN environment variable or `hf auth login` (a token in a config ends up in logs)",
    "run_name": "tracking.run_name=NAME",
}


def validate(cfg: DictConfig) -> tuple[dict, list[str]]:
    """Return (resolved config as plain dicts, warnings); raise ConfigError naming every problem."""
    interpolated = credentials.interpolations(OmegaConf.to_container(cfg, resolve=False))  # by name: set or not
    try:
        resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    except Exception as err:  # noqa: BLE001 - an interpolation error is a config problem, say so
        raise ConfigError(interpolated or credentials.redact([f"config does not resolve: {err}"])) from err
    schema_problems = check_schema(resolved, RunConfig, "")
    problems = [
        *interpolated,
        *credentials.held(resolved, skip={p.split(":", 1)[0] for p in interpolated}),
        *schema_problems,
    ]
    warnings: list[str] = []
    # strategy and trainer belong to peft and trl: checked against their classes whatever else is wrong
    if isinstance(resolved.get("strategy"), dict):
        problems += check_strategy(resolved["strategy"])
    if isinstance(resolved.get("trainer"), dict):
        problems += check_trainer(resolved, warnings)
    problems += check_objective(resolved, warnings)
    if isinstance(resolved.get("strategy"), dict) and isinstance(resolved.get("trainer"), dict):
        problems += check_loraplus(resolved)
    if not schema_problems:  # the checks below read typed values of our own keys
        problems += check_data(resolved["data"])
        problems += check_run(resolved)
        problems += check_distributed(resolved, warnings)
        problems += check_model(resolved, warnings)
    extra = resolved.get("secret_env") if isinstance(resolved.get("secret_env"), list) else []
    if problems:  # a problem quoting a value must not print the secret it holds
        raise ConfigError(keeping_kinds(problems, credentials.redact(problems, [str(n) for n in extra])))
    return resolved, credentials.redact(warnings, [str(n) for n in extra])


def check_schema(value: dict, schema: type, path: str) -> list[str]:
    """Unknown keys (with a suggestion), missing required keys and wrong types, for one dataclass level."""
    hints = typing.get_type_hints(schema)
    fields = {f.name: f for f in dataclasses.fields(schema)}
    problems = [_unknown_key(path + key, key, fields) for key in value if key not in fields]
    for name, f in fields.items():
        key = path + name
        if name not in value:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                problems.append(f"{key}: required")
            continue
        problems += _check_type(value[name], hints[name], key)
    return problems


def _check_type(value, hint, key: str) -> list[str]:
    if value == "???":
        return [f"{key}: required (set {key}=...)"]
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            return [f"{key}: expected a mapping, got {value!r}"]
        return check_schema(value, hint, key + ".")
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return []
        arms = [a for a in args if a is not type(None)]
        problems = [_check_type(value, arm, key) for arm in arms]
        if any(not p for p in problems):
            return []
        return (
            problems[0] if len(arms) == 1 else [f"{key}: expected {' or '.join(map(_type_name, arms))}, got {value!r}"]
        )
    if origin is list:
        ok = isinstance(value, list) and all(isinstance(v, args[0]) for v in value)
        return [] if ok else [f"{key}: expected a list of {args[0].__name__}, got {value!r}"]
    expected = {dict: dict, bool: bool, str: str, int: int, float: (int, float)}[hint]
    if isinstance(value, expected) and not (isinstance(value, bool) and hint is not bool):
        return []
    return [f"{key}: expected {hint.__name__}, got {value!r} ({type(value).__name__})"]


def _unknown_key(key: str, leaf: str, known) -> str:
    return f"unknown key '{key}'{did_you_mean(leaf, known)}"


def unknown_library_keys(keys: list[str]) -> list[str]:
    """`trainer.x` / `strategy.x` keys that trl.SFTConfig / peft.LoraConfig do not have (for early CLI errors)."""
    from trl import SFTConfig

    from finetune.models.strategy import OUR_KEYS, lora_fields

    known = {
        "trainer": {f.name for f in dataclasses.fields(SFTConfig) if f.init} | set(OWNED_TRAINER_KEYS),
        "strategy": lora_fields() | set(OUR_KEYS),
    }
    return [
        _unknown_key(key, key.split(".", 1)[1], known[key.split(".")[0]])
        for key in keys
        if key.split(".", 1)[1] not in known[key.split(".")[0]]
    ]


def check_strategy(strategy: dict) -> list[str]:
    from finetune.models.strategy import ADAPTER_STRATEGIES, OUR_KEYS, field_problems, init_problem, lora_fields

    name = strategy.get("name")
    if name not in STRATEGIES:
        return [f"strategy.name: '{name}' is not one of {', '.join(STRATEGIES)} (strategy=NAME)"]
    if name not in ADAPTER_STRATEGIES:
        return [
            (
                "strategy.loraplus_lr_ratio: LoRA+ raises the learning rate of LoRA's B matrices; strategy=full has "
                "none "
                "(remove it, or use strategy=lora)"
            )
            if k == "loraplus_lr_ratio"
            else _unknown_key(f"strategy.{k}", k, ["name"]) + " (strategy=full has no options)"
            for k in strategy
            if k != "name"
        ]
    known = lora_fields() | set(OUR_KEYS)
    problems = [_unknown_key(f"strategy.{k}", k, known) for k in strategy if k not in known]
    # what would change the base under the adapter, or what merging means, is refused with its reason
    # (finetune.strategy)
    problems += field_problems(strategy)
    init = init_problem(
        strategy.get("init_lora_weights", True), "dora" if name == "dora" or strategy.get("use_dora") else name
    )
    problems += [init] if init else []
    ratio = strategy.get("loraplus_lr_ratio")
    if ratio is not None and (not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or ratio <= 0):
        problems.append(
            f"strategy.loraplus_lr_ratio: must be a positive number (B's learning rate is trainer.learning_rate "
            f"times it; the LoRA+ paper uses 2-16) or null, got {ratio!r}"
        )
    elif ratio is not None and strategy.get("init_lora_weights") == "mica":
        problems.append(
            "strategy.loraplus_lr_ratio: under init_lora_weights=mica the B matrices are frozen (only A trains), "
            "so LoRA+ has nothing to speed up; remove one of them"
        )
    r, alpha, dropout = strategy.get("r", 8), strategy.get("lora_alpha", 8), strategy.get("lora_dropout", 0.0)
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        problems.append(f"strategy.r: must be a positive integer, got {r!r}")
    if not isinstance(alpha, (int, float)) or alpha <= 0:
        problems.append(f"strategy.lora_alpha: must be positive, got {alpha!r}")
    if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        problems.append(f"strategy.lora_dropout: must be in [0, 1), got {dropout!r}")
    if strategy.get("fan_in_fan_out"):
        problems.append(
            "strategy.fan_in_fan_out: must be false for GPT-Neo/NeoX/J (their layers are nn.Linear, not GPT-2's Conv1D)"
        )
    if "quantization" in strategy and name != "qlora":
        problems.append("strategy.quantization: only strategy=qlora quantizes the base")
    if name == "qlora":
        problems += _qlora_environment()
    return problems


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _qlora_environment() -> list[str]:
    import torch

    from finetune.models.strategy import bitsandbytes_problem

    problem = bitsandbytes_problem(torch.cuda.is_available())
    return [Problem(f"strategy=qlora: {problem}; or use strategy=lora", Problem.MACHINE)] if problem else []


def check_trainer(cfg: dict, warnings: list[str]) -> list[str]:
    from trl import SFTConfig

    trainer = cfg["trainer"]
    known = {f.name for f in dataclasses.fields(SFTConfig) if f.init}
    problems = []
    for key in trainer:
        if key in OWNED_TRAINER_KEYS:
            problems.append(f"trainer.{key}: set through {OWNED_TRAINER_KEYS[key]} instead")
        elif key not in known:
            problems.append(_unknown_key(f"trainer.{key}", key, known))

    def number(key, default):
        value = trainer.get(key, default)
        return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    if (number("learning_rate", 1) or 0) <= 0:
        problems.append(f"trainer.learning_rate: must be a positive number, got {trainer.get('learning_rate')!r}")
    for key in ("per_device_train_batch_size", "gradient_accumulation_steps"):
        value = trainer.get(key, 1)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            problems.append(f"trainer.{key}: must be an integer >= 1, got {value!r}")
    if (number("num_train_epochs", 3) or 0) <= 0 and (number("max_steps", -1) or -1) <= 0:
        problems.append("trainer.num_train_epochs / trainer.max_steps: set a positive number of epochs or steps")
    problems += check_report_to(trainer.get("report_to", "none"))
    if trainer.get("push_to_hub"):
        repo = trainer.get("hub_model_id") or "NAME/REPO"
        problems.append(
            f"trainer.push_to_hub: training never uploads (the Trainer would push checkpoints and its pickled "
            f"arguments, and fail at the end of the run when the Hub is out of reach); remove it and publish the "
            f"verified adapter after training: python -m finetune.push {cfg.get('output_dir') or 'RUN'} repo_id={repo}"
        )
    alpha = trainer.get("neftune_noise_alpha")
    if alpha is not None and (number("neftune_noise_alpha", None) is None or alpha <= 0):
        problems.append(
            f"trainer.neftune_noise_alpha: must be a positive number (NEFTune's uniform noise on the input "
            "embeddings in training, scaled by alpha / sqrt(length x hidden); the paper uses 5-15) or null, got "
            f"{alpha!r}"
        )
    fp16 = bool(trainer.get("fp16")) or (cfg.get("model") or {}).get("dtype") == "float16"
    if trainer.get("bf16") not in (True, False, "auto", None):
        problems.append(f"trainer.bf16: true, false or auto, got {trainer.get('bf16')!r}")
    if trainer.get("fp16") and trainer.get("bf16") is True:
        problems.append("trainer.fp16 and trainer.bf16: choose one (set trainer.fp16=false)")
    if fp16 and cfg.get("allow_fp16") is not True:
        problems.append(
            "trainer.fp16 / model.dtype=float16: GPT-Neo and GPT-NeoX overflow in fp16 (NaN loss); use bf16 "
            "(the default), or accept the risk with allow_fp16=true"
        )
    elif fp16 and not _has_cuda():
        problems.append(
            Problem(
                "trainer.fp16 / model.dtype=float16 on CPU: CPUs have no fast fp16 (1-2 GFLOP/s measured) "
                "and this family overflows in it; use trainer.bf16=auto model.dtype=auto (bf16 where native, "
                "else fp32)",
                Problem.MACHINE,
            )
        )
    elif fp16:
        warnings.append(
            "fp16 on GPT-Neo/NeoX: watch for overflow (inf/NaN loss) and the loss_scale in the logs "
            "(a scale that keeps halving means overflowing gradients); bf16 is safer where the GPU has it"
        )
    return problems


# trainer.optim values whose optimizer builds its own parameter groups or steps inside backward (LoRA+ cannot apply)
OWN_GROUP_OPTIMIZERS = ("galore", "apollo", "lomo")


def check_loraplus(cfg: dict) -> list[str]:
    """LoRA+ builds the optimizer's parameter groups itself (finetune.trainer); what would build them instead."""
    if cfg["strategy"].get("loraplus_lr_ratio") is None or cfg["strategy"].get("name") == "full":
        return []
    problems = []
    optim = str(cfg["trainer"].get("optim", "adamw_torch"))
    if any(kind in optim for kind in OWN_GROUP_OPTIMIZERS):
        problems.append(
            f"strategy.loraplus_lr_ratio: trainer.optim={optim} builds its own parameter groups (GaLore, APOLLO "
            "and LOMO do), so LoRA+'s B-matrix learning rate cannot apply; use trainer.optim=adamw_torch (or "
            "another plain optimizer) or remove strategy.loraplus_lr_ratio"
        )
    deepspeed = (cfg.get("distributed") or {}).get("deepspeed")
    if isinstance(deepspeed, dict) and deepspeed.get("optimizer"):
        problems.append(
            "strategy.loraplus_lr_ratio: distributed.deepspeed.optimizer makes DeepSpeed build its own optimizer "
            "over one parameter group, dropping LoRA+'s; remove distributed.deepspeed.optimizer (the "
            "Trainer's optimizer, with LoRA+'s groups, is then handed to DeepSpeed)"
        )
    return problems


def check_report_to(report_to) -> list[str]:
    """trainer.report_to names installed backends of finetune.tracking (transformers would fail only once training
    starts, after the model has loaded, or with "all" silently turn on whatever happens to be installed)."""
    from finetune.train.tracking import BACKENDS, PACKAGES, backends

    allowed = ", ".join(("none", *BACKENDS))
    items = [report_to] if isinstance(report_to, str) or report_to is None else report_to
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        return [f"trainer.report_to: expected one of {allowed} or a list of them, got {report_to!r}"]
    if "all" in items:
        return [
            "trainer.report_to: 'all' turns on every tracker that happens to be installed; name the ones you want, "
            "e.g. trainer.report_to=[tensorboard,wandb]"
        ]
    problems = [
        f"trainer.report_to: '{name}' is not one of {allowed}" for name in items if name not in ("none", *BACKENDS)
    ]
    if problems:
        return problems
    missing = [name for name in backends(items) if importlib.util.find_spec(name) is None]
    return [
        f"trainer.report_to: {name} is selected but not installed; pip install {PACKAGES[name]} "
        '(or pip install -e ".[tracking]")'
        for name in missing
    ]


def _type_name(hint) -> str:
    return f"a list of {typing.get_args(hint)[0].__name__}" if typing.get_origin(hint) is list else hint.__name__


def check_data(data: dict) -> list[str]:
    from finetune.data import sources, templates
    from finetune.data.tokenize import LENGTH_POLICIES

    problems = sources.missing_sources(data["path"], "data.path")
    if data["eval_path"]:
        problems += sources.missing_sources(data["eval_path"], "data.eval_path")
    try:
        template = templates.load(data["template"])
    except ConfigError as err:
        template = None
        problems += err.problems
    columns = data.get("columns") or {}
    if template and columns:
        problems += [
            f"data.columns.{name}: the template '{template.name}' has no field '{name}'; its fields: "
            f"{', '.join(template.fields)}"
            for name in columns
            if name not in template.fields
        ]
    if not 0 <= data["eval_fraction"] < 1:
        problems.append(f"data.eval_fraction: must be in [0, 1), got {data['eval_fraction']}")
    if data["max_length"] <= 0:
        problems.append(f"data.max_length: must be positive, got {data['max_length']}")
    if data["overlength"] not in LENGTH_POLICIES:
        problems.append(f"data.overlength: '{data['overlength']}' is not one of {', '.join(LENGTH_POLICIES)}")
    if data["packing"] not in (True, False, "auto"):
        problems.append(f"data.packing: '{data['packing']}' is not one of true, false, auto")
    if not 0 <= data["max_dropped_fraction"] <= 1:
        problems.append(f"data.max_dropped_fraction: must be in [0, 1], got {data['max_dropped_fraction']}")
    if data["max_row_bytes"] <= 0:
        problems.append(
            f"data.max_row_bytes: must be a positive number of bytes (default {8 * 2**20}), got {data['max_row_bytes']}"
        )
    return problems


def check_run(cfg: dict) -> list[str]:
    problems = []
    if cfg["card"]["domain"] not in CARD_DOMAINS:
        problems.append(f"card.domain: '{cfg['card']['domain']}' is not one of {', '.join(CARD_DOMAINS)}")
    out = Path(cfg["output_dir"]).expanduser()
    # '' / . / home / /, and (rank 0) files no run of ours wrote: where this machine would write the run
    problems += [Problem(p, Problem.MACHINE) for p in runlock.output_dir_problems(cfg)]
    # Rank 0 alone judges the run directory: the other ranks of a distributed launch share it and may validate after
    # rank 0 has already written this very run's run.json (they would refuse their own run and leave rank 0 waiting).
    if (out / "run.json").exists() and not cfg["overwrite"] and not cfg["resume"] and ranks.is_main():
        problems.append(
            Problem(
                f"output_dir: {out} already holds a run; continue it with resume=true, choose another "
                "output_dir=PATH or pass overwrite=true",
                Problem.MACHINE,
            )
        )
    if cfg["resume"] not in (False, True, "auto"):
        problems.append(f"resume: '{cfg['resume']}' is not one of false, true, auto")
    from finetune.models.fingerprint import RESUME_FIELDS

    problems += [
        f"resume_allow_drift: {_unknown_key(name, name, RESUME_FIELDS)[len('unknown key ') :]} is not a resume field; "
        f"fields: {', '.join(RESUME_FIELDS)}"
        for name in cfg["resume_allow_drift"]
        if name not in RESUME_FIELDS
    ]
    parent = next((p for p in [out, *out.parents] if p.exists()), None)
    if parent is not None and not _writable(parent):
        problems.append(Problem(f"output_dir: {parent} is not writable", Problem.MACHINE))
    if cfg["sample_generations"] < 0 or cfg["max_new_tokens"] <= 0:
        problems.append("sample_generations must be >= 0 and max_new_tokens > 0")
    if not cfg["sample_repetition_penalty"] > 0:
        problems.append(
            f"sample_repetition_penalty={cfg['sample_repetition_penalty']}: must be > 0; set "
            "sample_repetition_penalty=1 (off) or a little above 1, e.g. 1.2, to discourage repeated tokens"
        )
    problems += _check_early_stopping(cfg)
    if cfg["tracking"]["offline"] not in (True, False, "auto"):
        problems.append(f"tracking.offline: '{cfg['tracking']['offline']}' is not one of true, false, auto")
    return problems


def check_distributed(cfg: dict, warnings: list[str]) -> list[str]:
    """The distributed backend (conf/distributed/) against what is installed and how the run was launched."""
    dist = cfg["distributed"]
    backend = dist["backend"]
    if backend not in BACKENDS:
        return [f"distributed.backend: '{backend}' is not one of {', '.join(BACKENDS)} (distributed=NAME)"]
    problems = []
    if backend == "deepspeed":
        if not isinstance(dist.get("deepspeed"), dict):
            problems.append(
                "distributed.deepspeed: backend deepspeed needs the DeepSpeed config (use "
                "distributed=zero2|zero3|zero3_offload)"
            )
        if importlib.util.find_spec("deepspeed") is None:
            problems.append(
                Problem('distributed: DeepSpeed is not installed; pip install -e ".[deepspeed]"', Problem.MACHINE)
            )
    if backend == "fsdp" and not isinstance(dist.get("fsdp_config"), dict):
        problems.append("distributed.fsdp_config: backend fsdp needs its config (use distributed=fsdp)")
    if backend in ("ddp", "fsdp") and ranks.world_size() == 1:
        from finetune.config.compose import CONF_DIR  # the checkout's conf/, or the installed package's finetune/conf

        warnings.append(
            f"distributed={backend} in a single process: start the processes with accelerate launch "
            f"--config_file {CONF_DIR / 'accelerate' / 'ddp.yaml'} --num_processes N -m finetune ... "
            "(README: Distributed training)"
        )
    return problems


def _check_early_stopping(cfg: dict) -> list[str]:
    """Early stopping needs evaluations to compare and a checkpoint at each of them to go back to."""
    patience, trainer, data = cfg["early_stopping_patience"], cfg["trainer"], cfg["data"]
    if patience is None:
        return []
    if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
        return [f"early_stopping_patience: must be an integer >= 1 (or null), got {patience!r}"]
    problems = []
    evals, saves = trainer.get("eval_strategy", "no"), trainer.get("save_strategy", "steps")
    if evals == "no":
        problems.append(
            "early_stopping_patience: needs evaluations; set trainer.eval_strategy=steps (with trainer.eval_steps) or "
            "epoch"
        )
    elif saves != evals or (evals == "steps" and trainer.get("save_steps") != trainer.get("eval_steps")):
        problems.append(
            f"early_stopping_patience: checkpoints must be saved at every evaluation to keep the best one; set "
            f"trainer.save_strategy={evals}"
            + (" and trainer.save_steps equal to trainer.eval_steps" if evals == "steps" else "")
        )
    if not (data.get("eval_path") or data.get("eval_split") or data.get("eval_fraction")):
        problems.append(
            "early_stopping_patience: needs a held-out split; set data.eval_fraction (e.g. 0.05) or data.eval_path"
        )
    if trainer.get("metric_for_best_model") not in (None, "eval_loss", "loss"):
        problems.append("early_stopping_patience: compares eval loss; leave trainer.metric_for_best_model unset")
    return problems


def _writable(path: Path) -> bool:
    import os

    return os.access(path, os.W_OK)
