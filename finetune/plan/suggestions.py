"""When a plan does not fit: the ways to make it fit (finetune.plan.fixes, the list the out-of-memory message uses
too), each applied to the config and re-planned; the first of each kind that fits is shown, cheapest first."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

from finetune.config.compose import CONF_DIR
from finetune.errors import ConfigError
from finetune.plan.fixes import Facts, Fix, candidates
from finetune.plan.setup import Setup, distributed_name


@dataclass
class Suggestion:
    change: str
    overrides: list
    num_gpus: int
    total_bytes: int
    fits: bool
    tokens_per_second: float | None
    """An upper bound when state is offloaded to CPU (offload is CPU- and PCIe-bound)."""
    cpu_offload_bytes: int = 0
    note: str = ""


def facts_of(setup: Setup, num_gpus: int) -> Facts:
    return Facts(
        strategy=setup.strategy,
        micro_batch=setup.micro_batch,
        grad_accum=setup.grad_accum,
        checkpointing=setup.checkpointing,
        max_length=setup.max_length,
        cuda=setup.device == "cuda",
        num_gpus=num_gpus,
        sharded=distributed_name(setup) if setup.sharded else "",
        offloaded=setup.offload_optimizer and setup.offload_params,
    )


def suggestions(resolved: dict, setup: Setup, num_gpus: int, replan: Callable) -> list[Suggestion]:
    """The changes that make a config fit, cheapest first (finetune.plan.fixes). `replan(changed config, num_gpus)`
    plans a changed config. Of each kind only the first that fits is kept (the largest micro-batch, the fewest GPUs,
    the longest samples); when none fits, the three that come closest."""
    found, settled = [], set()
    for fix in candidates(facts_of(setup, num_gpus)):
        if fix.kind in settled:
            continue
        try:
            replanned = replan(changed_config(resolved, fix), fix.num_gpus)
        except ConfigError:
            continue
        found.append(
            Suggestion(
                fix.change,
                list(fix.overrides),
                fix.num_gpus,
                replanned.total_bytes,
                bool(replanned.fits),
                replanned.tokens_per_second,
                replanned.cpu_offload_bytes,
                fix.note,
            )
        )
        if replanned.fits:
            settled.add(fix.kind)
    fitting = [s for s in found if s.fits]
    return fitting or sorted(found, key=lambda s: s.total_bytes)[:3]


def changed_config(resolved: dict, fix: Fix) -> dict:
    """The resolved config with a fix's settings and groups applied. A strategy option's own keys go over the current
    strategy's (QLoRA keeps the LoRA rank and targets); a distributed option replaces the section."""
    changed = dict(resolved)
    for key, value in fix.settings.items():
        section, name = key.split(".", 1)
        changed[section] = {**changed[section], name: value}
    for group, option in fix.groups.items():
        if group == "strategy":
            changed["strategy"] = {**changed["strategy"], **_strategy_keys(option, changed["model"])}
        else:
            changed[group] = _group_file(group, option)
    return changed


def _strategy_keys(option: str, model: dict) -> dict:
    """conf/strategy/OPTION.yaml's own keys (not its defaults), resolved against the model
    (${model.lora_target_modules})."""
    from omegaconf import OmegaConf

    own = {k: v for k, v in _raw_group_file("strategy", option).items() if k != "defaults"}
    return OmegaConf.to_container(OmegaConf.create({"model": model, "strategy": own}), resolve=True)["strategy"]


@functools.cache
def _raw_group_file(group: str, option: str) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(CONF_DIR / group / f"{option}.yaml"), resolve=False)


@functools.cache
def _group_file(group: str, option: str) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(CONF_DIR / group / f"{option}.yaml"), resolve=True)
