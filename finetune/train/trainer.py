"""trl's trainers plus the guarantees they leave out; each override is small and says which defect it fixes.

`Guards` holds them and goes in front of a trl trainer: `GuardedSFTTrainer` (SFT) here, the preference objectives'
in finetune.train.preference_trainers. Preference batches have no `labels` (DPO/KTO: `completion_mask`; ORPO/SimPO:
`chosen_*` / `rejected_*` rows), so the guards read the batch through `trained_tokens` and `batch_ids`.

- `_run_epoch`: resuming from checkpoint-N of N trains no step N+1 (transformers steps before it checks max_steps).
- `_save_checkpoint`: transformers writes checkpoint-N in place, so a crash mid-save leaves a torn folder that
  resume picks as "latest". We let it write into checkpoints/.staging/, then (rank 0) swap the pickled
  training_args.bin for JSON, scrub local paths, write the manifest and rename (finetune.checkpoints). Rotation
  is ours and runs after the commit. A full disk is reported with the path and sizes; the previous checkpoint stays.
- `training_step` / `_get_grad_norm`: a non-finite loss or gradient norm, or an optimizer step without a single
  trained token, stops the run before the optimizer applies it (trl would log 0.0 for an all-masked batch and the
  Trainer would step on NaN gradients).
- progress: transformers' ProgressCallback / PrinterCallback give way to finetune.progress.TrainingProgress (one bar,
  one line per log), and `_track_num_input_tokens` counts every micro-batch's non-padding tokens for its tok/s
  (transformers counts only when asked, and counts a packed row's padding: no attention mask, and pad is EOS here).
- `create_accelerator_and_postprocess`: accelerate leaves FSDP out on CPU process groups (finetune.fsdp).
- `__init__`: trl's fused LM head scores every position on devices without Triton (CPU); finetune.lm_head makes it
  score only the trained ones, as it does on GPUs.
- `create_optimizer`: LoRA+ (`strategy.loraplus_lr_ratio`): peft's own create_loraplus_optimizer gives the B matrices
  trainer.learning_rate x ratio, with trainer.optim's class and kwargs and trainer.weight_decay (peft's default would
  be 0). The Trainer has no LoRA+ of its own; its scheduler then scales every group alike, so the ratio holds.
"""

from __future__ import annotations

import contextlib
import errno
import math
import shutil
from pathlib import Path

import torch
from peft.helpers import disable_input_dtype_casting
from transformers import PrinterCallback, ProgressCallback
from trl import SFTTrainer

from finetune.errors import DiskFullError, NonFiniteError
from finetune.models import lm_head
from finetune.runs import checkpoints
from finetune.train import fsdp, progress
from finetune.train.guards import StepLog


class Guards:
    """The overrides every trainer of ours carries; put it first in the bases (`class X(Guards, trl.XTrainer)`)."""

    perplexity = True  # eval_perplexity beside eval_loss: a language-model loss (not a preference objective's)

    def __init__(
        self,
        *args,
        keep_checkpoints: int | None,
        run_facts: dict,
        step_log: StepLog,
        after_save,
        loraplus_lr_ratio: float | None = None,
        **kwargs,
    ):
        self.loraplus_lr_ratio = loraplus_lr_ratio  # before super().__init__: it may build the optimizer
        super().__init__(*args, **kwargs)
        lm_head.compact_everywhere(self.model)  # trl's fused head projects every position off CUDA; only trained ones
        if getattr(self, "ref_model", None) is not None:  # DPO/KTO with a frozen copy as the reference
            lm_head.compact_everywhere(self.ref_model)
        self.keep_checkpoints = keep_checkpoints
        self.run_facts = run_facts
        self.step_log = step_log
        self.after_save = lambda folder: (_drop_reference_adapter(folder), after_save(folder))  # pickles, paths
        self.remove_callback(ProgressCallback)  # whichever of the two the Trainer added (disable_tqdm picks)
        self.remove_callback(PrinterCallback)
        self.progress = progress.TrainingProgress()
        self.add_callback(self.progress)

    def create_optimizer(self, model=None):
        if self.loraplus_lr_ratio is None or self.optimizer is not None:
            return super().create_optimizer(model)
        from peft.optimizers import create_loraplus_optimizer

        opt_model = self.model if model is None else model
        optimizer_cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        kwargs = dict(kwargs)  # validation refused the optimizers that bring their own groups (GaLore, APOLLO, LOMO)
        lr = kwargs.pop("lr", self.args.learning_rate)
        self.optimizer = create_loraplus_optimizer(
            opt_model,
            optimizer_cls,
            lr=lr,
            loraplus_lr_ratio=self.loraplus_lr_ratio,
            loraplus_weight_decay=self.args.weight_decay,
            **kwargs,
        )
        return self.optimizer

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        fsdp.enable_on_cpu(self)  # accelerate drops FSDP on CPU process groups and would train plain DDP

    def train(self, *args, **kwargs):
        try:
            return super().train(*args, **kwargs)
        finally:
            self.progress.close()  # stopped by an error: its message starts on a line of its own

    def _run_epoch(self, *args, **kwargs):
        """Resumed from the last checkpoint (killed during the final save): the Trainer would still run one optimizer
        step before checking max_steps (`step 11/10`); there is nothing left to train, so the loop ends here."""
        if self.state.global_step >= self.state.max_steps > 0:
            self.control.should_training_stop = True
            return None
        return super()._run_epoch(*args, **kwargs)

    def _save_checkpoint(self, model, trial) -> None:
        final_parent = Path(self._get_output_dir(trial=trial))
        staging = final_parent / checkpoints.STAGING
        name = f"checkpoint-{self.state.global_step}"
        self._get_output_dir = lambda trial=None: str(staging)  # instance attribute shadows the method while saving
        try:
            super()._save_checkpoint(model, trial)
        except Exception as err:
            free = shutil.disk_usage(final_parent).free  # before the half-written save is removed and frees its space
            if self.args.should_save:
                shutil.rmtree(staging / name, ignore_errors=True)
            if _is_disk_full(err, free, estimate_checkpoint_bytes(self.model)):
                raise DiskFullError(_disk_full_message(final_parent, name, free, err)) from err
            raise
        finally:
            del self._get_output_dir
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            staged = staging / name
            best = self.state.best_model_checkpoint
            if best and Path(best).parent == staging:  # the Trainer recorded the staging path of the best checkpoint
                self.state.best_model_checkpoint = str(final_parent / Path(best).name)
                self.state.save_to_json(str(staged / "trainer_state.json"))
            self.after_save(staged)
            checkpoints.write_manifest(staged, step=self.state.global_step, run=self.run_facts)
            checkpoints.commit(staged, final_parent / name)
            with contextlib.suppress(OSError):
                staging.rmdir()  # empty now; a leftover .staging always means a save that did not finish
            checkpoints.rotate(final_parent, self.keep_checkpoints, self.state.best_model_checkpoint)
        self.accelerator.wait_for_everyone()

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Perplexity beside every eval loss, fp16's loss scale beside every loss (train.log, metrics.json,
        TensorBoard/W&B alike)."""
        if self.perplexity and isinstance(logs.get("eval_loss"), float):
            logs["eval_perplexity"] = math.exp(min(logs["eval_loss"], 50.0))
        scaler = getattr(self.accelerator, "scaler", None)
        if "loss" in logs and scaler is not None and scaler.is_enabled():  # fp16: a halving scale means overflow
            logs["loss_scale"] = float(scaler.get_scale())
        super().log(logs, start_time)

    def training_step(self, model, inputs, num_items_in_batch=None):
        step = self.state.global_step + 1
        trained = num_items_in_batch if num_items_in_batch is not None else trained_tokens(inputs)
        if trained is not None and int(trained) == 0:
            raise NonFiniteError(
                f"optimizer step {step} has no trained token (every label in its batches is masked): "
                "the loss would be NaN or 0.0; check data.template and data.overlength"
            )
        with disable_input_dtype_casting(model, active=self._autocast_casts_lora_inputs()):
            loss = super().training_step(model, inputs, num_items_in_batch)
        value = loss.item()
        if not math.isfinite(value):
            raise NonFiniteError(
                f"the loss is {value} at optimizer step {step}; stopped before the update, the last "
                "checkpoint is intact. Lower trainer.learning_rate, keep bf16/fp32 (not fp16), check the data"
            )
        self.step_log.add(batch_ids(inputs), value)
        return loss

    def _autocast_casts_lora_inputs(self) -> bool:
        """Under accelerate's autocast (bf16/fp16 mixed precision; not DeepSpeed or FSDP, which cast the weights
        themselves) peft's cast of every LoRA input to the adapter's fp32 is undone by autocast at once: two copies of
        each activation through every LoRA layer, 7% of a CPU step (issue 26), for the same values."""
        mixed = self.accelerator.mixed_precision in ("bf16", "fp16")
        return mixed and not self.is_deepspeed_enabled and not self.is_fsdp_enabled

    def _track_num_input_tokens(self, inputs) -> None:
        if self.args.include_num_input_tokens_seen == "all":  # asked for every token, padding included
            return super()._track_num_input_tokens(inputs)
        count = torch.as_tensor(progress.input_tokens(inputs), device=self.args.device, dtype=torch.int64)
        self.state.num_input_tokens_seen += int(self.accelerator.gather(count).sum().item())
        return None

    def _get_grad_norm(self, model, grad_norm=None):
        norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        value = float(norm) if norm is not None else 0.0
        if not math.isfinite(value):
            raise NonFiniteError(
                f"the gradient norm is {value} at optimizer step {self.state.global_step + 1}; stopped before "
                "the update, the last checkpoint is intact. Lower trainer.learning_rate or keep bf16/fp32"
            )
        return norm


class GuardedSFTTrainer(Guards, SFTTrainer):
    """trl's SFTTrainer with our guards."""


REFERENCE_ADAPTER = "ref"  # trl's copy of the starting adapter (a PeftModel given to DPO/KTO): the frozen reference


def _drop_reference_adapter(folder: Path) -> None:
    """peft saves every adapter of a model, so trl's frozen reference lands in `ref/` beside the trained adapter;
    a resume rebuilds it from init_from, and a published adapter must be the trained one alone."""
    ref = Path(folder) / REFERENCE_ADAPTER
    if (ref / "adapter_config.json").is_file() and (Path(folder) / "adapter_config.json").is_file():
        shutil.rmtree(ref)


def trained_tokens(inputs: dict):
    """The tokens one micro-batch trains, from whichever mask its trainer's collator built (None: no such mask)."""
    if "labels" in inputs:
        return (inputs["labels"] != -100).sum()
    if "completion_mask" in inputs:  # DPO / KTO
        return inputs["completion_mask"].sum()
    if "chosen_labels" in inputs:  # ORPO / SimPO
        return sum((inputs[f"{side}_labels"] != -100).sum() for side in ("chosen", "rejected"))
    return None


def batch_ids(inputs: dict) -> torch.Tensor:
    """Every token id of one micro-batch, flattened in a fixed order: what train_steps.jsonl hashes per step."""
    if "input_ids" in inputs:
        return inputs["input_ids"]
    return torch.cat([inputs[key].flatten() for key in sorted(inputs) if key.endswith("input_ids")])


def _is_disk_full(err: BaseException, free: int, need: int) -> bool:
    """ENOSPC, or any save error while less than one checkpoint's size is free: a full disk inside torch.save
    surfaces as RuntimeError("basic_ios::clear: iostream error"), with no errno."""
    if free < need:
        return True
    while err is not None:
        if getattr(err, "errno", None) == errno.ENOSPC or "No space left on device" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


def _disk_full_message(final_parent: Path, name: str, free: int, err: BaseException) -> str:
    previous = checkpoints.candidates(final_parent)
    need = sum(p.stat().st_size for p in previous[0].rglob("*") if p.is_file()) if previous else None
    keep = f"{previous[0]} is intact" if previous else "no earlier checkpoint exists"
    size = f"; a checkpoint needs about {need / 2**20:.1f} MiB" if need else ""
    return (
        f"no space left on the device of {final_parent} while saving {name} ({free / 2**20:.1f} MiB free{size}); "
        f"{keep}. "
        f"Free space and run again with resume=true (the save failed with: {type(err).__name__}: {str(err)[:200]})"
    )


def estimate_checkpoint_bytes(model) -> int:
    """Trainable weights + two Adam moments (fp32) + the small files: what one checkpoint writes."""
    # ds_numel: the real size of a ZeRO-3 partitioned one
    trainable = [p for p in model.parameters() if p.requires_grad]
    return sum(getattr(p, "ds_numel", p.numel()) * (p.element_size() + 8) for p in trainable) + (1 << 20)
