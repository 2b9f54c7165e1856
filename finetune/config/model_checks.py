"""The base model against the config, before any weights load: family, dtype and attention backend, weights the
loader may read (safetensors, shard indexes inside the folder), sequence length against the positions, and LoRA
targets and lora_bias checked on the meta device from config.json. Part of finetune.config.validate.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from finetune.config.schema import FAMILIES
from finetune.errors import did_you_mean


def check_model(cfg: dict, warnings: list[str]) -> list[str]:
    from finetune.models import load as models

    model = cfg["model"]
    family = model["family"]
    problems = []
    if family not in FAMILIES:
        return [f"model.family: '{family}' is not one of {', '.join(FAMILIES)}"]
    if model["dtype"] not in models.DTYPES:
        problems.append(f"model.dtype: '{model['dtype']}' is not one of {', '.join(models.DTYPES)}")
    attn = model["attn_implementation"]
    if attn is not None and attn not in models.ATTENTION[family]:
        why = " (its flash-attention-2 path ignores the local attention window)" if family == "gpt_neo" else ""
        problems.append(
            f"model.attn_implementation: '{attn}' is not supported for {family}{why}; use one of "
            f"{', '.join(models.ATTENTION[family])}"
        )
    if model["tiny"] is not None and model["tiny"] not in models.TINY_ARCH:
        problems.append(f"model.tiny: '{model['tiny']}' is not one of {', '.join(models.TINY_ARCH)} (or null)")
    if model["trust_remote_code"]:
        warnings.append(
            "model.trust_remote_code=true runs Python code shipped with the checkpoint; this family never needs it"
        )
    problems += _check_weights(model)
    if problems:
        return problems
    try:
        config = models.architecture_config(OmegaConf.create(model))
    except Exception as err:  # noqa: BLE001 - report any reason the config cannot be read, with the fix
        return [
            f"model.name_or_path: cannot read the config of '{model['name_or_path']}' ({type(err).__name__}: "
            f"{str(err).splitlines()[0]}); "
            "give a local checkpoint directory (model.name_or_path=DIR) or make the Hub reachable"
        ]
    if config.model_type != models.MODEL_TYPES[family]:
        problems.append(
            f"model.family: '{family}' but {model['name_or_path']} is a {config.model_type}; select the matching "
            "model= config"
        )
        return problems
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if positions and cfg["data"]["max_length"] > positions:
        problems.append(f"data.max_length: {cfg['data']['max_length']} exceeds the model's {positions} positions")
    if cfg["strategy"].get("name") in ("lora", "dora", "qlora"):
        problems += _check_targets(cfg["strategy"].get("target_modules"), models.linear_module_names(config), family)
        if cfg["strategy"].get("lora_bias") and not problems:
            problems += _check_lora_bias(cfg["strategy"], config, family)
    return problems


def _check_weights(model: dict) -> list[str]:
    """A local base must hold safetensors weights the loader may read: training loads safetensors only (never
    unpickles), and a shard index naming a file outside the folder is refused (finetune.shards: the rules merge
    applies), before the data is prepared or any weights load. A tiny base not built yet and Hub ids are skipped."""
    from finetune.errors import IntegrityError
    from finetune.models import shards

    folder = Path(model["name_or_path"]).expanduser()
    if not (folder / "config.json").is_file():
        return []
    try:
        shards.weight_files(folder)
    except IntegrityError as err:
        pickles = [p.name for p in folder.iterdir() if p.suffix in shards.PICKLE_SUFFIXES]
        if not (folder / shards.SAFETENSORS_INDEX).is_file() and pickles:
            return [
                f"model.name_or_path: {folder} holds only pickled weights ({', '.join(sorted(pickles))}); training "
                "loads "
                "safetensors only (unpickling can run code). Convert them once in a trusted environment: python -c "
                '"from '
                f"transformers import AutoModelForCausalLM as M; M.from_pretrained('{folder}', use_safetensors=False)"
                f".save_pretrained('{folder}-safetensors')\" and set model.name_or_path={folder}-safetensors"
            ]
        return [f"model.name_or_path: {err}"]
    return []


def _check_lora_bias(strategy: dict, config, family: str) -> list[str]:
    """lora_bias adds the adapter's bias to the base layer's bias when merging: every adapted layer needs one."""
    import torch

    from finetune.models.load import OUTPUT_EMBEDDINGS, meta_model

    targets, excluded = strategy.get("target_modules"), strategy.get("exclude_modules") or []
    excluded = [excluded] if isinstance(excluded, str) else excluded
    model = meta_model(config)
    biasless = sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear)
            and module.bias is None
            and (leaf := name.rsplit(".", 1)[-1]) not in OUTPUT_EMBEDDINGS
            and leaf not in excluded
            and (targets == "all-linear" or leaf in (targets or []))
        }
    )
    if not biasless:
        return []
    return [
        f"strategy.lora_bias: {', '.join(biasless)} of {family} have no bias, so the merge has nowhere to put the "
        "adapter's bias; set strategy.target_modules (or strategy.exclude_modules) to layers with a bias, or remove "
        "lora_bias"
    ]


def _check_targets(targets, linear_names: set[str], family: str) -> list[str]:
    from finetune.models.load import OUTPUT_EMBEDDINGS

    if targets == "all-linear":  # peft's own shorthand; it already leaves the output layer out
        return []
    if isinstance(targets, str) or not targets:
        return ["strategy.target_modules: give a list of module names or all-linear"]
    available = sorted(linear_names - set(OUTPUT_EMBEDDINGS))
    problems = []
    for name in targets:
        if name in OUTPUT_EMBEDDINGS:
            problems.append(
                f"strategy.target_modules: '{name}' is the output embedding; it is never wrapped (huge, and tied on "
                "GPT-Neo)"
            )
        elif name not in linear_names:
            hint = did_you_mean(name, available)
            problems.append(
                f"strategy.target_modules: '{name}' is not a Linear layer of {family}{hint}; available: "
                f"{', '.join(available)}"
            )
    return problems
