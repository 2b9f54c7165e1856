"""trl's preference trainers, trained on our token ids (finetune.data.preference) instead of re-tokenized text.

Our preference rows are rendered and tokenized with our templates exactly as SFT renders them: no BOS (GPT-Neo's BOS
is its EOS, and SFT never prepends it), each completion ends with EOS, and every row already fits `max_length`.
trl 1.16 would tokenize text itself, and differently (docs/design/preference.md on the `preference-design` branch):

- DPO and KTO: `_prepare_dataset` extracts a prompt and re-tokenizes, so it is a pass-through here (KTO also gets the
  `KL_completion_ids` rotation its collator and loss need). trl's collators then build prompt+completion and the
  completion masks from our ids.
- ORPO and CPO (SimPO): `tokenize_row` prepends BOS and cuts completions; here it only lays our ids out in the eight
  columns trl's collator pads. ORPO's NLL term also covers the prompt; here it covers completion tokens only (EOS
  included), like SFT and like CPO's.

Each class is a plain subclass of trl's trainer, taking an already-loaded model or PeftModel, so that the SFT guards
(finetune.train.trainer) can be put in front of it. The classes are built on first access (PEP 562 `__getattr__`):
importing trl's trainers takes seconds, and the registry `OBJECTIVES` is read by config validation and `--help`.

SimPO is `CPOConfig(loss_type="simpo", cpo_alpha=0.0)`: `OBJECTIVES["simpo"].build_config(...)` forces the first and
defaults the second (`cpo_alpha=1.0` would be CPO-SimPO, which adds an NLL term).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

IGNORE = -100
PAIRED_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")
UNPAIRED_COLUMNS = ("prompt_ids", "completion_ids", "label")
TRAINERS = ("DPO", "KTO", "ORPO", "SimPO")


@dataclasses.dataclass(frozen=True)
class Objective:
    """One preference objective: which of our trainers and trl configs run it, and what data it reads.

    `fixed` are config values the objective forces (a user value that differs is an error); `defaults` are values it
    sets unless the user does. Class references are import paths so that reading the registry imports no trl."""

    name: str
    trainer: str  # attribute of this module (built lazily)
    config: str  # "module:Class"
    kind: str  # "paired" | "unpaired"
    reference_free: bool
    fixed: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def columns(self) -> tuple[str, ...]:
        return PAIRED_COLUMNS if self.kind == "paired" else UNPAIRED_COLUMNS

    def trainer_class(self) -> type:
        return _classes()[self.trainer]

    def config_class(self) -> type:
        module, name = self.config.split(":")
        return getattr(importlib.import_module(module), name)

    def method_fields(self) -> tuple[str, ...]:
        """The config's own init fields (minus TrainingArguments'): what `objective.*` may set, for validation and
        --help."""
        return _method_fields(self.config)

    def config_values(self, **values) -> dict[str, Any]:
        """`values` with the objective's defaults filled in and its fixed values enforced."""
        for key, value in self.fixed.items():
            if key in values and values[key] != value:
                raise ValueError(f"objective {self.name} fixes {key}={value!r}; got {values[key]!r}")
        return {**self.defaults, **values, **self.fixed}

    def build_config(self, **values):
        """The trl config for this objective (TrainingArguments and method keys together)."""
        return self.config_class()(**self.config_values(**values))


@functools.cache
def _method_fields(config: str) -> tuple[str, ...]:
    from transformers import TrainingArguments

    module, name = config.split(":")
    cls = getattr(importlib.import_module(module), name)
    inherited = {f.name for f in dataclasses.fields(TrainingArguments)}
    return tuple(f.name for f in dataclasses.fields(cls) if f.init and f.name not in inherited)


def simpo_config_defaults() -> dict[str, Any]:
    """CPOConfig values that make CPO the SimPO paper's objective (no NLL term); beta and simpo_gamma stay the
    caller's (the paper: beta 2-2.5, gamma/beta about 0.5)."""
    return {"loss_type": "simpo", "cpo_alpha": 0.0}


OBJECTIVES: dict[str, Objective] = {
    o.name: o
    for o in (
        Objective("dpo", "DPO", "trl:DPOConfig", "paired", reference_free=False),
        Objective("orpo", "ORPO", "trl.experimental.orpo:ORPOConfig", "paired", reference_free=True),
        Objective("kto", "KTO", "trl:KTOConfig", "unpaired", reference_free=False),
        Objective(
            "simpo",
            "SimPO",
            "trl.experimental.cpo:CPOConfig",
            "paired",
            reference_free=True,
            fixed=MappingProxyType({"loss_type": "simpo"}),
            defaults=MappingProxyType({"cpo_alpha": 0.0}),
        ),
    )
}


def check_rows(dataset, columns: tuple[str, ...], max_length: int | None, name: str) -> None:
    """Refuse rows outside our data contract instead of letting trl drop or cut them silently: the columns, at least
    one completion token (else ORPO/SimPO average 0/0), prompt + completion within `max_length`."""
    missing = [c for c in columns if c not in (dataset.column_names or ())]
    if missing:
        raise ValueError(
            f"{name} dataset lacks {missing}: preference trainers take rows tokenized by finetune.data.preference "
            f"(columns {list(columns)}), not text"
        )
    if not hasattr(dataset, "__len__"):  # an IterableDataset: not read ahead (its rows arrive once)
        return
    prompts = dataset["prompt_ids"]
    for column in (c for c in columns if c.endswith("_ids") and c != "prompt_ids"):
        for index, (prompt, completion) in enumerate(zip(prompts, dataset[column])):
            if not completion:
                raise ValueError(f"{name} row {index}: empty {column}")
            if max_length is not None and len(prompt) + len(completion) > max_length:
                raise ValueError(
                    f"{name} row {index}: prompt + {column} is {len(prompt) + len(completion)} tokens, over "
                    f"max_length={max_length}; finetune.data.preference fits rows before training"
                )


def rotate_completions(dataset, batch_size: int):
    """trl's KTO KL pairs (kto_trainer.py `add_kl_completion_ids`, a closure there): completions rotated by +1 inside
    each chunk of `batch_size` rows, so each prompt meets another row's completion of its own batch."""

    def rotate(rows):
        rows["KL_completion_ids"] = [rows["completion_ids"][-1]] + rows["completion_ids"][:-1]
        return rows

    return dataset.map(rotate, batched=True, batch_size=batch_size)


def paired_columns(prompt_ids: list[int], chosen_ids: list[int], rejected_ids: list[int]) -> dict[str, list[int]]:
    """The eight columns trl's ORPO/CPO collator pads, from our ids as they are: no BOS, no EOS added (ours end with
    it), labels -100 on the prompt."""
    out = {"prompt_input_ids": list(prompt_ids), "prompt_attention_mask": [1] * len(prompt_ids)}
    for side, completion in (("chosen", chosen_ids), ("rejected", rejected_ids)):
        out[f"{side}_input_ids"] = list(prompt_ids) + list(completion)
        out[f"{side}_attention_mask"] = [1] * (len(prompt_ids) + len(completion))
        out[f"{side}_labels"] = [IGNORE] * len(prompt_ids) + list(completion)
    return out


def _tokenize_row(self, feature, model=None) -> dict:
    """tokenize_row for ORPO/CPO: our row laid out as trl's columns (trl's would prepend BOS and re-tokenize text)."""
    missing = [c for c in PAIRED_COLUMNS if c not in feature]
    if missing:
        raise ValueError(f"{type(self).__name__} takes rows tokenized by finetune.data.preference; missing {missing}")
    prompt, chosen, rejected = (feature[c] for c in PAIRED_COLUMNS)
    for side, completion in (("chosen", chosen), ("rejected", rejected)):
        if not completion:
            raise ValueError(f"empty {side}_ids: the per-token mean log-prob would be 0/0")
        if self.max_length is not None and len(prompt) + len(completion) > self.max_length:
            raise ValueError(f"prompt + {side}_ids is over max_length={self.max_length}")
    return paired_columns(prompt, chosen, rejected)


@functools.cache
def _classes() -> dict[str, type]:
    import torch.nn.functional as F
    from trl import DPOTrainer, KTOTrainer
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer
    from trl.experimental.utils import pad_to_length

    class DPO(DPOTrainer):
        """DPOTrainer on our paired ids: `_prepare_dataset` checks them and passes them through."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            check_rows(dataset, PAIRED_COLUMNS, args.max_length, dataset_name)
            return dataset

    class KTO(KTOTrainer):
        """KTOTrainer on our unpaired (already shuffled) ids: pass-through plus trl's KL completion rotation."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            check_rows(dataset, UNPAIRED_COLUMNS, args.max_length, dataset_name)
            if self.calculate_KL and "KL_completion_ids" not in (dataset.column_names or ()):
                # the rows are batched by the train size in training and by the eval size in evaluate()
                size = args.per_device_train_batch_size
                if dataset_name != "train" and args.per_device_eval_batch_size > 1:
                    size = args.per_device_eval_batch_size
                dataset = rotate_completions(dataset, size)
            return dataset

    class ORPO(ORPOTrainer):
        """ORPOTrainer on our paired ids, with the NLL term on completion tokens only."""

        tokenize_row = _tokenize_row

        def concatenated_forward(self, model, batch):
            """trl's forward; its chosen NLL (prompt + completion, orpo_trainer.py "computed over the full prompt and
            response") replaced by the token-mean cross-entropy over the chosen completion + EOS, as CPO does."""
            out = super().concatenated_forward(model, batch)
            chosen_logits = out[2]  # [batch, positions - 1, vocab]: the predictions of tokens 1..
            if self.is_encoder_decoder:
                return out
            labels = pad_to_length(batch["chosen_labels"], chosen_logits.shape[1] + 1, pad_value=IGNORE)
            labels = labels[:, 1:].to(chosen_logits.device)
            nll = F.cross_entropy(chosen_logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE)
            return (*out[:4], nll, *out[5:])

    class SimPO(CPOTrainer):
        """CPOTrainer on our paired ids (SimPO is its loss_type="simpo", cpo_alpha=0)."""

        tokenize_row = _tokenize_row

    classes = {"DPO": DPO, "KTO": KTO, "ORPO": ORPO, "SimPO": SimPO}
    for name, cls in classes.items():  # picklable and named as if defined at module level
        cls.__module__, cls.__qualname__ = __name__, name
    return classes


def __getattr__(name: str):
    if name in TRAINERS:
        return _classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
