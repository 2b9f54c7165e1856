"""What changes in a run with its objective (objective.name): the data it trains on, trl's config and trainer class,
and the model it starts from. SFT keeps finetune.data.tokenize and trl's SFTTrainer; a preference objective (DPO,
ORPO, KTO, SimPO) reads pairs or labelled completions (finetune.data.preference) and trains with trl's own trainer
behind our guards (finetune.train.preference_trainers). run.py asks this module and stays one story for all of them.

The reference of DPO and KTO (the frozen policy they measure against):
- LoRA/QLoRA from a fresh adapter: the base with the adapter switched off (trl's `use_adapter(model, None)`), no copy;
- `init_from=RUN`: trl copies the starting adapter into a frozen `ref` adapter (one more LoRA, not a second model);
  the guards drop `ref/` from every saved folder (finetune.train.trainer);
- full fine-tuning: a frozen copy loaded through our loader (safetensors, revision, pad policy), or none with
  `objective.precompute_ref_log_probs=true` (the reference scores the data once before the first step; trl caches
  the scores per process for an in-memory dataset, so a resume scores them again).
"""

from __future__ import annotations

import functools
from typing import Any

from finetune import console as cli


def name(cfg) -> str:
    return (cfg.get("objective") or {}).get("name", "sft")


def is_preference(cfg) -> bool:
    return name(cfg) != "sft"


def spec(cfg):
    """The preference objective's registry entry (finetune.train.preference_trainers.OBJECTIVES)."""
    from finetune.train.preference_trainers import OBJECTIVES

    return OBJECTIVES[name(cfg)]


def prepare(cfg, tokenizer, template, progress, batch_size: int):
    """The tokenized rows: SFT samples (finetune.data.tokenize) or preference rows (finetune.data.preference)."""
    if not is_preference(cfg):
        from finetune.data.tokenize import prepare as prepare_sft

        return prepare_sft(cfg.data, tokenizer, template, cfg.seed, progress=progress, batch_size=batch_size)
    from finetune.data.preference import prepare_preferences

    return prepare_preferences(cfg.data, tokenizer, template, cfg.seed, spec(cfg).kind, progress=progress)


def describe(cfg, data) -> list[str]:
    if not is_preference(cfg):
        from finetune.data.tokenize import describe as describe_sft

        return describe_sft(data)
    from finetune.data.preference import describe_preferences

    return [f"objective: {name(cfg)}", *describe_preferences(data)]


def training_config(cfg, kwargs: dict):
    """trl's config object for this objective: SFTConfig, or the objective's own config with its method keys
    (objective.*) and the values it fixes (SimPO: CPO's simpo loss)."""
    if not is_preference(cfg):
        from trl import SFTConfig

        return SFTConfig(**kwargs)
    from omegaconf import OmegaConf

    kwargs.pop("dataset_kwargs", None)  # SFT's: the preference configs have no such field
    method = {k: v for k, v in OmegaConf.to_container(cfg.objective).items() if k not in ("name", "init_from")}
    kwargs.update(method, max_length=cfg.data.max_length)  # rows already fit it (finetune.data.preference)
    return spec(cfg).build_config(**kwargs)


def trainer_class(cfg):
    if not is_preference(cfg):
        from finetune.train.trainer import GuardedSFTTrainer

        return GuardedSFTTrainer
    return _guarded(name(cfg))


@functools.cache
def _guarded(objective: str) -> type:
    """trl's trainer of the objective (with our data fixes: finetune.train.preference_trainers) behind our guards."""
    from finetune.train.preference_trainers import OBJECTIVES
    from finetune.train.trainer import Guards

    base = OBJECTIVES[objective].trainer_class()
    return type(f"Guarded{base.__name__}", (Guards, base), {"perplexity": False, "__module__": __name__})


def starting_point(cfg, model, strategy_cfg: dict) -> tuple[Any, Any]:
    """(model, peft_config) for the trainer: a fresh adapter from the strategy, or init_from's adapter, trainable
    (then trl's reference is a frozen copy of it, and peft_config must be None)."""
    from finetune.models import strategy

    init_from = (cfg.get("objective") or {}).get("init_from")
    if not init_from:
        return model, strategy.peft_config(strategy_cfg)
    from peft import PeftModel

    from finetune.errors import IntegrityError
    from finetune.runs import checkpoints, rundir

    target = rundir.locate(init_from)
    problem = checkpoints.verify(target.weights)  # a tampered or torn adapter is refused before it trains on
    if problem:
        raise IntegrityError(f"objective.init_from: {problem}; train that run again or point init_from elsewhere")
    cli.say(f"objective: continuing the adapter of {target.run_dir or target.weights} (init_from)")
    model = PeftModel.from_pretrained(model, str(target.weights), is_trainable=True)
    return model, None


def reference_model(cfg, tokenizer, quantization):
    """A frozen copy for DPO/KTO full fine-tuning without precomputed reference log-probs; None otherwise (LoRA:
    the adapter switched off, or trl's `ref` copy of init_from's adapter)."""
    if not is_preference(cfg) or spec(cfg).reference_free or cfg.strategy.name != "full":
        return None
    if (cfg.get("objective") or {}).get("precompute_ref_log_probs"):
        return None
    from finetune.models import load as models

    cli.say("objective: loading a frozen copy of the base as the reference (full fine-tuning)")
    reference = models.load_model(cfg.model, tokenizer, quantization)
    reference.requires_grad_(False)
    return reference.eval()
