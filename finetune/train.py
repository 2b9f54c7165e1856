"""run(cfg): validate -> data -> training args -> model -> SFTTrainer -> before/after -> save.

trl's SFTTrainer owns the loop; this file only puts the pieces in the order that matters:
- every config problem is reported before any weights are read;
- data is tokenized before the model loads, so bad rows fail in seconds, not after a 40 GB load;
- SFTConfig (TrainingArguments) is built before `from_pretrained`: under DeepSpeed ZeRO-3 that is what makes
  transformers shard the weights while loading instead of materialising the whole model on every rank.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from transformers import TrainerCallback  # this module loads only when training starts

from finetune import artifacts, models, strategy
from finetune.data import describe, packing, prepare, prompt_text
from finetune.data import templates as data_templates
from finetune.errors import EXIT_OK, FinetuneError
from finetune.validate import validate

log = logging.getLogger("finetune")


def run(cfg: DictConfig) -> Path:
    """Train as configured; return the run directory. Raises FinetuneError subclasses for bad input."""
    resolved, warnings = validate(cfg)
    for warning in warnings:
        _say(f"warning: {warning}")
    cfg = OmegaConf.create(resolved)
    run_dir = Path(cfg.output_dir).expanduser()
    run_dir.mkdir(parents=True, exist_ok=True)
    _quiet_libraries()

    import torch
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    set_seed(cfg.seed)
    models.ensure_available(cfg.model)
    tokenizer = models.load_tokenizer(cfg.model)
    template = data_templates.load(cfg.data.template)
    tokenizer.chat_template = template.chat_template  # saved with the tokenizer: inference renders as training did
    data = prepare(cfg.data, tokenizer, template, cfg.seed)
    train_set, eval_set = data.as_datasets()
    for line in describe(data):
        _say(line)
    if data.not_kept:
        artifacts.write_jsonl(run_dir / "rejected_rows.jsonl", [n.as_dict() for n in data.not_kept])
        _say(f"rows that will not train, with reasons: {run_dir / 'rejected_rows.jsonl'}")

    args = SFTConfig(**_training_arguments(cfg, run_dir, has_eval=eval_set is not None, cuda=torch.cuda.is_available()))
    record = artifacts.RunRecord(run_dir, preset=_preset_name(), strategy=cfg.strategy.name, base_model=cfg.model.name_or_path,
                                 revision=cfg.model.revision, seed=cfg.seed, data=data.accounting)
    try:
        artifacts.write_config(run_dir, resolved, template.path)
        model = models.load_model(cfg.model, tokenizer, strategy.quantization(resolved["strategy"]))
        collator = None
        if data.packed is not None:
            model.config.use_cache = False  # a KV cache turns off transformers' packed-sequence masks
            leak = packing.verify_isolation(model, model.config.vocab_size, cfg.data.max_length)
            _say(f"packing: samples isolated in this model (probe difference {leak:.1e})")
            collator = packing.PackedCollator(tokenizer.pad_token_id)
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=train_set,
            eval_dataset=eval_set,
            processing_class=tokenizer,
            data_collator=collator,
            peft_config=strategy.peft_config(resolved["strategy"]),
            callbacks=[_NoPickledArgs()],
        )
        trainable, total = _count_parameters(trainer.model)
        _say(f"model: {cfg.model.name_or_path} ({cfg.model.family}), {cfg.strategy.name}: {trainable:,} of {total:,} parameters train ({trainable / total:.2%})")
        record.update(trainable_parameters=trainable, total_parameters=total)

        eval_before = trainer.evaluate(metric_key_prefix="eval") if eval_set is not None and cfg.eval_before_training else {}
        prompts = [prompt_text(tokenizer, template, row) for row in data.eval_rows[: cfg.sample_generations]]
        before = [_generate(trainer.model, tokenizer, p, cfg.max_new_tokens) for p in prompts]

        started = time.perf_counter()
        result = trainer.train()
        train_seconds = time.perf_counter() - started

        eval_after = trainer.evaluate(metric_key_prefix="eval") if eval_set is not None else {}
        after = [_generate(trainer.model, tokenizer, p, cfg.max_new_tokens) for p in prompts]
        weights_dir = run_dir / ("adapter" if cfg.strategy.name != "full" else "model")
        trainer.save_model(str(weights_dir))  # gathers ZeRO-3 / FSDP shards; adapter only for PEFT models
        if trainer.is_world_process_zero():
            artifacts.replace_pickled_args(weights_dir, args)
            history = trainer.state.log_history
            artifacts.write_metrics(run_dir, history, eval_before=eval_before, eval_after=eval_after, train=result.metrics)
            artifacts.plot_loss(run_dir, history, eval_before.get("eval_loss"))
            samples = [{"prompt": p, "before": b, "after": a} for p, b, a in zip(prompts, before, after)]
            artifacts.write_json(run_dir / "samples.json", {"samples": samples})
            record.finish("completed", EXIT_OK, train_seconds=round(train_seconds, 2), global_steps=result.global_step,
                          train_loss=result.training_loss, eval_loss_before=eval_before.get("eval_loss"),
                          eval_loss_after=eval_after.get("eval_loss"))
            _summary(run_dir, eval_before, eval_after, samples, train_seconds)
    except FinetuneError as err:
        record.finish(f"failed:{type(err).__name__}", err.exit_code, error=str(err))
        raise
    except BaseException as err:
        record.finish(f"failed:{type(err).__name__}", 1, error=str(err)[:2000])
        raise
    return run_dir


def _training_arguments(cfg: DictConfig, run_dir: Path, has_eval: bool, cuda: bool) -> dict:
    """trainer.* unchanged, plus the keys we own (see validate.OWNED_TRAINER_KEYS)."""
    kwargs = OmegaConf.to_container(cfg.trainer)
    if not has_eval and kwargs.get("eval_strategy", "no") != "no":
        kwargs["eval_strategy"] = "no"
    kwargs.setdefault("disable_tqdm", False)  # transformers hides the bar when its logger is quiet, and ours is
    if kwargs.get("load_best_model_at_end") and not has_eval:
        kwargs["load_best_model_at_end"] = False
    kwargs.update(
        output_dir=str(run_dir / "checkpoints"),
        seed=cfg.seed,
        data_seed=cfg.seed,
        use_cpu=kwargs.get("use_cpu", False) or not cuda,  # bf16 autocast on CPU needs use_cpu (else "no bf16 GPU")
        dataset_kwargs={"skip_prepare_dataset": True},  # finetune.data already tokenized and masked the rows
        max_length=None,
    )
    if cfg.distributed.backend == "deepspeed":
        kwargs["deepspeed"] = OmegaConf.to_container(cfg.distributed.deepspeed)
    return kwargs


def _generate(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """Greedy continuation of a prompt (the completion only)."""
    import torch

    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").to(model.device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    model.train(was_training)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def _count_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


class _NoPickledArgs(TrainerCallback):
    """After each checkpoint save, replace the pickled training_args.bin with JSON (see artifacts)."""

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            artifacts.replace_pickled_args(Path(args.output_dir) / f"checkpoint-{state.global_step}", args)


def _preset_name() -> str | None:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().job.config_name if HydraConfig.initialized() else None


def _summary(run_dir: Path, before: dict, after: dict, samples: list[dict], seconds: float) -> None:
    if "eval_loss" in before and "eval_loss" in after:
        b, a = before["eval_loss"], after["eval_loss"]
        _say(f"held-out eval loss: {b:.3f} -> {a:.3f} ({(a - b) / b:+.1%}) after {seconds:.0f} s of training")
    for sample in samples:
        _say("held-out prompt:\n" + _indent(sample["prompt"]))
        _say("before training:\n" + _indent(sample["before"] or "(empty)"))
        _say("after training:\n" + _indent(sample["after"] or "(empty)"))
    _say(f"run directory: {run_dir}")


def _indent(text: str) -> str:
    return "\n".join(f"    | {line}" for line in text.strip().splitlines())


def _say(message: str) -> None:
    print(f"[finetune] {message}", file=sys.stderr, flush=True)


def _quiet_libraries() -> None:
    """Our own lines and the training progress bar; not a wall of library warnings and loading bars."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # weight-loading bars; the training bar is tqdm's own (disable_tqdm)
