"""objective.* checked before any model loads: the name, its keys against the objective's own trl config, the data
and trainer settings a preference objective cannot take, and `init_from` (a finished run with the same base and
template). Keys of TrainingArguments stay under trainer.*; the objective's method keys (beta, loss_type, ...) live
under objective.*, so one trainer group serves every objective.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from finetune.config.schema import OBJECTIVES
from finetune.errors import ConfigError, Problem, did_you_mean

OUR_KEYS = ("name", "init_from")
# keys of the trl configs that another part of our config owns: key -> where to set it instead
OWNED_OBJECTIVE_KEYS = {
    "max_length": "data.max_length=N (prompt + the longer completion)",
    "truncation_mode": "data.overlength=drop|error|truncate_prompt_left (completions are never cut)",
    "max_completion_length": "data.max_length=N (prompt + the longer completion)",
    "padding_free": "no key (preference batches are padded rows; GPT-Neo's positions need them)",
    "pad_token": "model.pad_token",
    "padding_value": "model.pad_token",
    "pad_to_multiple_of": "no key (rows are padded to the longest of the batch)",
    "model_init_kwargs": "model.* (the model is loaded by finetune.models.load)",
    "trust_remote_code": "model.trust_remote_code",
    "is_encoder_decoder": "no key (this family is decoder-only)",
    "dataset_num_proc": "no key (finetune.data tokenizes the rows before the model loads)",
    "generate_during_eval": "sample_generations=N (generations before and after training, no W&B needed)",
}
LEARNING_RATE_WARNING = 1e-4  # SFT's 2e-4 overshoots preference objectives (their papers use 5e-7 to 5e-6, LoRA ~5e-6)


def method_fields(name: str) -> set[str]:
    """The objective's own fields: its trl config's, less TrainingArguments' (those are trainer.*)."""
    from finetune.train.preference_trainers import OBJECTIVES as TRAINERS

    return set(TRAINERS[name].method_fields())


def sft_only_trainer_keys() -> set[str]:
    """trl.SFTConfig's own fields: under trainer.* they mean nothing to a preference trainer."""
    from transformers import TrainingArguments
    from trl import SFTConfig

    base = {f.name for f in dataclasses.fields(TrainingArguments)}
    return {f.name for f in dataclasses.fields(SFTConfig) if f.init and f.name not in base}


def check_objective(cfg: dict, warnings: list[str]) -> list[str]:
    objective = cfg.get("objective") or {}
    if not isinstance(objective, dict):
        return [f"objective: expected a mapping (objective=sft|dpo|orpo|kto|simpo), got {objective!r}"]
    name = objective.get("name", "sft")
    if name not in OBJECTIVES:
        return [
            f"objective.name: '{name}' is not one of {', '.join(OBJECTIVES)} (objective=NAME)"
            + did_you_mean(str(name), OBJECTIVES)
        ]
    problems = _init_from_problems(cfg, objective.get("init_from"))
    if name == "sft":
        return problems + [
            f"unknown key 'objective.{key}': objective=sft has only name and init_from "
            "(preference keys need objective=dpo|orpo|kto|simpo)"
            for key in objective
            if key not in OUR_KEYS
        ]
    fields = method_fields(name)
    for key in objective:
        if key in OUR_KEYS:
            continue
        if key in OWNED_OBJECTIVE_KEYS:
            problems.append(f"objective.{key}: set through {OWNED_OBJECTIVE_KEYS[key]} instead")
        elif key not in fields:
            problems.append(f"unknown key 'objective.{key}' for objective={name}{did_you_mean(key, fields)}")
    if name == "simpo" and objective.get("loss_type", "simpo") != "simpo":
        problems.append("objective.loss_type: objective=simpo is CPO's simpo loss; remove objective.loss_type")
    problems += _data_problems(cfg["data"], name) if isinstance(cfg.get("data"), dict) else []
    problems += _trainer_problems(cfg, name, fields, warnings) if isinstance(cfg.get("trainer"), dict) else []
    return problems


def _data_problems(data: dict, name: str) -> list[str]:
    problems = []
    if data.get("packing") is True:
        problems.append(f"data.packing: objective={name} trains on padded pairs; set data.packing=false (or auto)")
    if data.get("train_on_inputs"):
        problems.append(f"data.train_on_inputs: objective={name} scores the completions only; remove it")
    if data.get("overlength") == "chunk":
        problems.append(
            f"data.overlength: chunk cuts texts into pieces, which has no meaning for objective={name}; use drop, "
            "error or truncate_prompt_left"
        )
    return problems


def _trainer_problems(cfg: dict, name: str, fields: set[str], warnings: list[str]) -> list[str]:
    trainer = cfg["trainer"]
    problems = [
        f"trainer.{key}: a key of objective={name}; set objective.{key} instead" for key in trainer if key in fields
    ]
    sft_only = sft_only_trainer_keys() - fields
    problems += [
        f"trainer.{key}: an SFT option (trl.SFTConfig); objective={name} does not use it, remove it"
        for key in trainer
        if key in sft_only
    ]
    batch = trainer.get("per_device_train_batch_size", 8)
    if name == "kto" and isinstance(batch, int) and batch < 2:
        problems.append(
            "trainer.per_device_train_batch_size: objective=kto estimates its KL term from the other rows of a batch; "
            "set it to 2 or more"
        )
    if (cfg["objective"].get("sync_ref_model") or False) and (cfg.get("strategy") or {}).get("name") != "full":
        problems.append(
            "objective.sync_ref_model: TR-DPO updates a reference copy, which LoRA does not have; remove it"
        )
    rate = trainer.get("learning_rate")
    tiny = bool((cfg.get("model") or {}).get("tiny"))
    if isinstance(rate, (int, float)) and rate >= LEARNING_RATE_WARNING and not tiny:
        warnings.append(
            f"trainer.learning_rate={rate:g} with objective={name}: preference objectives diverge at SFT rates; "
            "5e-6 to 5e-5 is usual with LoRA (the dpo_* presets set their own)"
        )
    return problems


def _init_from_problems(cfg: dict, init_from) -> list[str]:
    """A finished run of the same base and data template whose adapter this run continues."""
    if init_from is None:
        return []
    if not isinstance(init_from, str) or not init_from.strip():
        return [f"objective.init_from: expected a run directory or null, got {init_from!r}"]
    from finetune.runs import rundir

    if Path(init_from).expanduser().resolve() == Path(str(cfg.get("output_dir", ""))).expanduser().resolve():
        return [
            f"objective.init_from: {init_from} is this run's own output_dir; a fresh run there would replace the "
            "adapter it starts from. Choose another output_dir=PATH"
        ]
    try:
        target = rundir.locate(init_from)
    except ConfigError as err:
        return [f"objective.init_from: {p}" for p in err.problems]
    except Exception as err:  # noqa: BLE001 - an unfinished run (IntegrityError) or an unreadable one
        return [f"objective.init_from: {err}"]
    strategy = (cfg.get("strategy") or {}).get("name")
    if target.kind != "adapter" or strategy == "full":
        return [
            Problem(
                f"objective.init_from: {init_from} holds a {target.kind}, and strategy={strategy}; init_from continues "
                "an adapter (lora, dora, qlora). To continue a full fine-tune, point model.name_or_path at its model/ "
                "folder instead",
                Problem.MACHINE,
            )
        ]
    return _same_base_and_template(cfg, init_from, target.config or {})


def _same_base_and_template(cfg: dict, init_from: str, theirs: dict) -> list[str]:
    problems = []
    ours_model, their_model = cfg.get("model") or {}, theirs.get("model") or {}
    for key in ("name_or_path", "revision"):
        if their_model.get(key) != ours_model.get(key):
            problems.append(
                f"objective.init_from: {init_from} trained on model.{key}={their_model.get(key)!r}, this run has "
                f"{ours_model.get(key)!r}; its adapter only fits its own base (set model.{key} to match)"
            )
    ours_template = (cfg.get("data") or {}).get("template")
    their_template = (theirs.get("data") or {}).get("template")
    if ours_template != their_template and not _same_template_file(init_from, ours_template):
        problems.append(
            f"objective.init_from: {init_from} was trained with data.template={their_template}, this run renders "
            f"with {ours_template}; preference tuning must see the prompt layout SFT trained on "
            f"(set data.template={their_template})"
        )
    return [Problem(p, Problem.MACHINE) for p in problems]


def _same_template_file(init_from: str, ours: str | None) -> bool:
    """The run's saved data_template.yaml has the same text as the template this run names (a copy under another
    name is the same template)."""
    from finetune.data import templates

    saved = Path(init_from).expanduser() / "data_template.yaml"
    try:
        return bool(ours) and saved.read_text(encoding="utf-8") == templates.resolve_path(ours).read_text(
            encoding="utf-8"
        )
    except (OSError, ConfigError):
        return False
