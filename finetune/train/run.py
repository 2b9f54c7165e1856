"""run(cfg): validate -> (find the checkpoint to resume) -> data -> training args -> model -> trainer -> before/after -> save.

trl's SFTTrainer owns the loop (with our guards: finetune.trainer); this file only puts the pieces in the order
that matters:
- every config problem is reported before any weights are read;
- data is tokenized before the model loads, so bad rows fail in seconds, not after a 40 GB load;
- SFTConfig (TrainingArguments) is built before `from_pretrained`: under DeepSpeed ZeRO-3 that is what makes
  transformers shard the weights while loading instead of materialising the whole model on every rank;
- run.json is written before anything can fail and says at every exit how the run ended (errors.py's codes).

Distributed runs (`accelerate launch` / torchrun, conf/distributed/): every rank runs this same function on the same
`output_dir`; only rank 0 writes run files (finetune.ranks before the trainer exists, `is_world_process_zero` after).
"""

from __future__ import annotations

import contextlib
import shutil
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from finetune.runs import artifacts, checkpoints, rundir, runlock
from finetune.adapters import card
from finetune import console as cli, ranks
from finetune.models import fingerprint, load as models, strategy
from finetune.train import oom, tracking
from finetune.config import precision
from finetune.data.tokenize import describe, prepare, prompt_text
from finetune.data import packing
from finetune.data import templates as data_templates
from finetune.errors import EXIT_FAILURE, EXIT_OK, ConfigError, FinetuneError, IntegrityError, Preempted
from finetune.train.guards import FlushStepLog, OnTrainBegin, PreemptionSignals, StepLog, StopBeforeTraining, StopOnPreemption, before_training
from finetune.config.validate import validate

LOG_FILE = "train.log"  # the run's log: our lines (cli.transcript) and, through Hydra's job logging, library warnings


def run(cfg: DictConfig) -> Path:
    """Train as configured (or resume); return the run directory. Raises FinetuneError subclasses (exit codes)."""
    cli.new_transcript()
    if ranks.is_main():  # before validation logs a line: a run refused for the lock writes nothing (finetune.runlock)
        problem = _held(cfg)
        if problem:
            raise ConfigError(problem)
    resolved, warnings = validate(cfg)
    for warning in warnings:
        cli.say(f"warning: {warning}")
    bf16, why = precision.choose()
    chosen = precision.resolve(resolved, bf16)  # before the config is hashed and written: it records what ran
    precision_used = f"{precision.describe(resolved)} ({why if chosen else 'as configured'})"
    cli.say(f"precision: {precision_used}")
    cfg = OmegaConf.create(resolved)
    run_dir = Path(cfg.output_dir).expanduser()
    if cfg.resume and _already_complete(run_dir):  # nothing to do: nothing is written, not even the lock
        return run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    with runlock.RunLock(run_dir, enabled=ranks.is_main(), say=cli.say):  # one run per output_dir, for its lifetime
        if ranks.is_main():
            cli.log_to(run_dir / LOG_FILE)  # our lines, also those said above, for post-mortems
        try:
            return _run(cfg, resolved, run_dir, precision_used)
        except FinetuneError as err:
            cli.transcript(f"error: {err}")
            raise
        except BaseException:
            import traceback

            cli.transcript(traceback.format_exc().rstrip())
            raise
        finally:
            cli.close_log()


def _held(cfg) -> str | None:
    """Whether another run holds output_dir's lock, read-only (None for an output_dir that validate() refuses)."""
    try:
        value = cfg.output_dir
    except Exception:  # noqa: BLE001 - does not resolve: validate() says why
        return None
    return None if runlock.unsafe_output_dir(value) else runlock.held_problem(Path(str(value)).expanduser())


def _run(cfg, resolved: dict, run_dir: Path, precision_used: str) -> Path:
    """The run, once rank 0 holds output_dir's lock."""
    cli.quiet_libraries()
    checkpoints_dir = run_dir / "checkpoints"
    resume_from = _resume_checkpoint(cfg, run_dir, checkpoints_dir) if cfg.resume else None
    if resume_from == "completed":
        return run_dir
    main = ranks.is_main()  # the other ranks of a distributed launch share this run directory and write nothing here
    if main and resume_from is None:  # a fresh run (overwrite=true): old checkpoints would resume or rotate wrongly
        runlock.clear_for_fresh_run(checkpoints_dir, cfg.allow_foreign_files, cli.say)  # ours only, by their manifests
    if main:
        checkpoints.clear_staging(checkpoints_dir)
    previous = _previous_attempts(run_dir) if cfg.resume else []
    record = artifacts.RunRecord(run_dir, enabled=main, preset=_preset_name(), overrides=given_overrides(), strategy=cfg.strategy.name, base_model=cfg.model.name_or_path,
                                 revision=cfg.model.revision, seed=cfg.seed, config_hash=artifacts.config_hash(resolved),
                                 resumed_from=resume_from.name if resume_from else None, previous_attempts=previous,
                                 precision=precision_used)
    with PreemptionSignals(deferred=ranks.world_size() > 1) as signals:
        try:
            with (tracking.session(cfg, run_dir, _preset_name(), resuming=resume_from is not None),  # report_to's environment, this run only
                  oom.explained(cfg, checkpoints_dir)):
                _train(cfg, resolved, run_dir, record, resume_from, signals)
        except FinetuneError as err:
            status = "preempted" if isinstance(err, Preempted) else f"failed:{err.reason}"
            record.finish(status, err.exit_code, error=str(err))
            _leave_process_group(wait=False)
            raise
        except BaseException as err:
            record.finish(f"failed:{type(err).__name__}", EXIT_FAILURE, error=str(err)[:2000])
            _leave_process_group(wait=False)
            raise
    _leave_process_group(wait=True)
    return run_dir


def _leave_process_group(wait: bool) -> None:
    """End a distributed launch's process group while Python is still whole. Left to interpreter teardown, gloo's
    worker threads can still hold tensors when the interpreter is half gone: the rank dies with SIGABRT ("terminate
    called without an active exception") after a finished run, and torchrun reports the launch failed (seen in CI on
    a ZeRO-3 resume; pytorch/pytorch#190489). `wait`: on success, every rank first waits for rank 0's last writes,
    so none tears down a connection another is still using; after an error, a peer may never arrive, so only this
    rank's side is closed."""
    import sys

    if "torch.distributed" not in sys.modules:  # a single-process run never imported it
        return
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if wait:
        dist.barrier()
        dist.destroy_process_group()
        return
    with contextlib.suppress(Exception):  # the error being raised is the one to report, not a teardown's
        dist.destroy_process_group()


def _train(cfg, resolved: dict, run_dir: Path, record, resume_from: Path | None, signals: PreemptionSignals) -> None:
    import torch
    from transformers import set_seed
    from trl import SFTConfig

    from finetune.train.progress import rows_bar
    from finetune.train.trainer import GuardedSFTTrainer, estimate_checkpoint_bytes

    set_seed(cfg.seed)
    models.ensure_available(cfg.model)
    tokenizer = models.load_tokenizer(cfg.model)
    template = data_templates.load(cfg.data.template)
    tokenizer.chat_template = template.chat_template  # saved with the tokenizer: inference renders as training did
    data = prepare(cfg.data, tokenizer, template, cfg.seed, progress=rows_bar, batch_size=cfg.trainer.get("per_device_train_batch_size", 8))
    _stop_if_signalled(signals, "data preparation")  # tokenizing runs to its end (seconds), then nothing else starts
    train_set, eval_set = data.as_datasets()
    for line in describe(data):
        cli.say(line)
    if data.not_kept and ranks.is_main():
        artifacts.write_jsonl(run_dir / "rejected_rows.jsonl", [n.as_dict() for n in data.not_kept])
        cli.say(f"rows that will not train, with reasons: {run_dir / 'rejected_rows.jsonl'}")
    base_folder = fingerprint.model_files(cfg.model)
    base_print = fingerprint.base_model(base_folder) if base_folder else f"unavailable:{cfg.model.name_or_path}@{cfg.model.revision}"
    data_print = fingerprint.dataset(data.train + data.eval, data.packed is not None)
    record.update(data=data.accounting, dataset_fingerprint=data_print, base_model_fingerprint=base_print)

    training_args = _training_arguments(cfg, run_dir, has_eval=eval_set is not None, cuda=torch.cuda.is_available())
    keep_checkpoints = training_args.pop("save_total_limit", None)
    args = SFTConfig(**training_args, save_total_limit=None)  # rotation is ours, after each commit (trainer.py)
    distributed = args.world_size > 1  # the process group exists from here on
    signals.arm()
    if distributed and cfg.distributed.backend == "deepspeed":
        _start_deepspeed_comm()
    if distributed:
        _same_on_every_rank(f"config {artifacts.config_hash(resolved)[:12]}, data {data_print[:12]}, "
                            f"resume from {resume_from.name if resume_from else 'step 0'}")
    facts = fingerprint.run_facts(cfg, resolved["strategy"], base_print, data_print, args.world_size)
    if resume_from is not None:
        _check_drift(resume_from, facts, list(cfg.resume_allow_drift), base_folder)
    if ranks.is_main():
        artifacts.write_config(run_dir, resolved, template.path)
    _stop_if_signalled(signals, "fingerprinting the base and the data")
    with oom.explained(cfg, run_dir / "checkpoints", loading=True):
        model = models.load_model(cfg.model, tokenizer, strategy.quantization(resolved["strategy"]))
    _stop_if_signalled(signals, "loading the model")
    collator = None
    if data.packed is not None:
        model.config.use_cache = False  # a KV cache turns off transformers' packed-sequence masks
        leak = packing.verify_isolation(model, model.config.vocab_size, cfg.data.max_length)
        cli.say(f"packing: samples isolated in this model (probe difference {leak:.1e})")
        collator = packing.PackedCollator(tokenizer.pad_token_id)
    public_base = _public_name(cfg.model)
    step_log = StepLog(run_dir / "train_steps.jsonl", checkpoints.step_of(resume_from) if resume_from else 0, enabled=args.should_save)
    trainer = GuardedSFTTrainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        processing_class=tokenizer,
        data_collator=collator,
        peft_config=strategy.peft_config(resolved["strategy"]),
        callbacks=[StopOnPreemption(signals), StopBeforeTraining(signals), FlushStepLog(step_log), *_early_stopping(cfg, eval_set), *tracking.callbacks(args.report_to)],
        keep_checkpoints=keep_checkpoints,
        run_facts=facts,
        step_log=step_log,
        after_save=lambda folder: artifacts.clean_weights_folder(folder, args, models.local_path(cfg.model), public_base),
        loraplus_lr_ratio=resolved["strategy"].get("loraplus_lr_ratio"),  # LoRA+: B matrices at lr x ratio (trainer.py)
    )
    loraplus = resolved["strategy"].get("loraplus_lr_ratio")
    record.update(optimizer={"name": str(getattr(args.optim, "value", args.optim)), **({"loraplus_lr_ratio": loraplus} if loraplus else {})})
    trainable, total = _count_parameters(trainer.model)
    cli.say(f"model: {cfg.model.name_or_path} ({cfg.model.family}), {cfg.strategy.name}: {trainable:,} of {total:,} parameters train ({trainable / total:.2%})")
    record.update(trainable_parameters=trainable, total_parameters=total)
    _check_free_space(run_dir, estimate_checkpoint_bytes(trainer.model), args)

    prompts = [prompt_text(tokenizer, template, row) for row in data.eval_rows[: cfg.sample_generations]]
    eval_before, before = {}, []

    def measure_base() -> None:
        """The "before" numbers: held-out loss and sample generations of the untouched base."""
        if eval_set is not None and cfg.eval_before_training:
            eval_before.update(trainer.evaluate(metric_key_prefix="eval"))  # StopBeforeTraining ends it at a signal
        for prompt in prompts:
            _stop_if_signalled(signals, "the sample generations before training")
            before.append(_generate(trainer.model, tokenizer, prompt, cfg.max_new_tokens))

    if not distributed:
        measure_base()
        _stop_if_signalled(signals, "the measurements before training")
    else:
        # trainer.evaluate() before trainer.train() breaks distributed training in transformers 5.23 + accelerate
        # 1.15. DDP: evaluate() marks the bare model as prepared, train() then skips the DDP wrapper, gradients are
        # never averaged and the ranks silently train apart (measured: adapter 0.039 off a single-process run, vs 5e-6
        # without it). DeepSpeed: train() finds evaluate()'s inference engine and fails in backward. So the base is
        # measured inside train(), once the model is wrapped, before the first step, with the adapter switched off
        # (the untouched base also on a resume). A resumed full fine-tune holds the checkpoint's weights by then.
        def measure_base_in_loop() -> None:
            if cfg.strategy.name == "full" and resume_from is not None:
                cli.say("before-training numbers: not measured on a resumed distributed full fine-tune (the weights are the checkpoint's)")
                return
            with trainer.model.disable_adapter() if cfg.strategy.name != "full" else contextlib.nullcontext():
                measure_base()
            if eval_before:  # a baseline, not a point of this run's curve (single-process runs start a fresh log too)
                trainer.state.log_history.pop()

        trainer.add_callback(OnTrainBegin(measure_base_in_loop))

    started = time.perf_counter()
    with oom.explained(cfg, run_dir / "checkpoints", step=lambda: trainer.state.global_step):
        result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    train_seconds = time.perf_counter() - started
    if cfg.distributed.backend == "fsdp":
        from finetune.train import fsdp

        record.update(fsdp_sharded_parameters=fsdp.sharded_parameters(trainer.model_wrapped))
    if signals.received:
        raise Preempted(f"{signals.received}: stopped at step {trainer.state.global_step} with a committed checkpoint in "
                        f"{run_dir / 'checkpoints'}; run the same command with resume=true to continue")

    eval_after = trainer.evaluate(metric_key_prefix="eval") if eval_set is not None else {}
    after = [_generate(trainer.model, tokenizer, p, cfg.max_new_tokens) for p in prompts]
    weights_dir = run_dir / (rundir.ADAPTER_DIR if cfg.strategy.name != "full" else rundir.MODEL_DIR)
    trainer.save_model(str(weights_dir))  # gathers ZeRO-3 / FSDP shards; adapter only for PEFT models
    if trainer.is_world_process_zero():
        artifacts.clean_weights_folder(weights_dir, args, models.local_path(cfg.model), public_base)
        base = fingerprint.base_record(cfg.model, base_folder, models.hub_id(cfg.model), base_print, strategy.quantization(resolved["strategy"]))
        artifacts.write_json(weights_dir / rundir.BASE_RECORD, base)
        history = trainer.state.log_history
        artifacts.write_metrics(run_dir, history, eval_before=eval_before, eval_after=eval_after, train=result.metrics)
        artifacts.plot_loss(run_dir, history, eval_before.get("eval_loss"))
        samples = [{"prompt": p, "before": b, "after": a} for p, b, a in zip(prompts, before, after)]
        artifacts.write_json(run_dir / "samples.json", {"samples": samples})
        record.update(train_seconds=round(train_seconds, 2), global_steps=result.global_step,
                      train_loss=result.training_loss, eval_loss_before=eval_before.get("eval_loss"),
                      eval_loss_after=eval_after.get("eval_loss"), **_best(trainer.state),
                      weights_manifest=f"{weights_dir.name}/{checkpoints.MANIFEST}")  # a folder missing it is refused
        card.write(weights_dir, run_dir, resolved, "adapter" if weights_dir.name == rundir.ADAPTER_DIR else "model")
        checkpoints.seal(weights_dir, weights_dir.name)  # merge, generate, evaluate and push verify it
        # completed only now: a run killed while writing its card or manifest is still "running", and resume finishes it
        record.finish("completed", EXIT_OK)
        _summary(run_dir, eval_before, eval_after, samples, train_seconds)


def _stop_if_signalled(signals: PreemptionSignals, phase: str) -> None:
    """Before the first optimizer step there is nothing to commit: a preemption signal stops the run at the next safe
    point of whatever it is doing (data, loading, the measurements before training), not after a step."""
    if signals.received:
        raise Preempted(before_training(signals.received, phase))


def _resume_checkpoint(cfg, run_dir: Path, checkpoints_dir: Path):
    """The newest complete checkpoint (torn ones set aside), "completed" for a finished run, or None (auto: fresh)."""
    if _already_complete(run_dir):
        return "completed"
    found, set_aside = checkpoints.latest_complete(checkpoints_dir, lambda message: cli.say(f"warning: {message}"))
    if found is not None:
        cli.say(f"resuming from {found}")
        return found
    if cfg.resume == "auto":
        cli.say(f"no complete checkpoint in {checkpoints_dir}: starting from step 0 (resume=auto)")
        return None
    torn = f"; set aside as torn or corrupt: {'; '.join(set_aside)}" if set_aside else ""
    raise IntegrityError(f"resume=true: no complete checkpoint in {checkpoints_dir}{torn}. Start again with overwrite=true, "
                         "or use resume=auto to start from step 0 when there is nothing to resume")


def _already_complete(run_dir: Path) -> bool:
    if artifacts.read_run_record(run_dir).get("status") != "completed":
        return False
    cli.say(f"run already complete ({run_dir / 'run.json'}): nothing to resume; use overwrite=true to train again")
    return True


def _check_drift(checkpoint: Path, facts: dict, allowed: list[str], base_folder: Path | None) -> None:
    saved = checkpoints.manifest_of(checkpoint).get("run", {})
    recorded = str(saved.get("base_model", ""))
    if base_folder and recorded and recorded != facts["base_model"] and not recorded.startswith("unavailable:"):
        # a checkpoint from before the full-file fingerprint: compare the base the way it was fingerprinted then
        facts = {**facts, "base_model": fingerprint.in_format_of(recorded, base_folder) or facts["base_model"]}
    changes = fingerprint.drift(saved, facts, allowed)
    if changes:
        raise ConfigError([f"resume: {line}" for line in changes]
                          + [f"resuming {checkpoint} with these changes would not continue the same run; undo them, or allow "
                             f"named fields with resume_allow_drift=[{','.join(dict.fromkeys(c.split(':')[0].split('.')[0] for c in changes))}]"])


def _check_free_space(run_dir: Path, checkpoint_bytes: int, args) -> None:
    free = shutil.disk_usage(run_dir).free
    if args.save_strategy != "no" and free < 2 * checkpoint_bytes:
        raise ConfigError(f"output_dir: {free / 2**20:.1f} MiB free on the device of {run_dir}, but one checkpoint needs about "
                          f"{checkpoint_bytes / 2**20:.1f} MiB (twice that is required to replace one safely); free space or "
                          "choose another output_dir")


def _previous_attempts(run_dir: Path) -> list[dict]:
    state = artifacts.read_run_record(run_dir)
    attempts = state.get("previous_attempts", [])
    if state:
        attempts.append({k: state.get(k) for k in ("status", "started", "finished", "exit_code", "resumed_from")})
    return attempts


def _public_name(model_cfg) -> str:
    """What adapter configs name the base: the Hub id, or a local folder's name (never a local path)."""
    hub_id = models.hub_id(model_cfg)
    return hub_id or models.local_path(model_cfg).name


def _training_arguments(cfg: DictConfig, run_dir: Path, has_eval: bool, cuda: bool) -> dict:
    """trainer.* unchanged, plus the keys we own (see validate.OWNED_TRAINER_KEYS)."""
    kwargs = OmegaConf.to_container(cfg.trainer)
    if not has_eval and kwargs.get("eval_strategy", "no") != "no":
        kwargs["eval_strategy"] = "no"
    kwargs.setdefault("disable_tqdm", False)  # transformers hides the bar when its logger is quiet, and ours is
    # DDP: every trainable parameter (adapter or full model) gets a gradient every step, so DDP need not search the
    # graph for unused ones each step (transformers' default turns the search on, and torch warns on every rank).
    kwargs.setdefault("ddp_find_unused_parameters", False)
    if kwargs.get("load_best_model_at_end") and not has_eval:
        kwargs["load_best_model_at_end"] = False
    kwargs.update(
        output_dir=str(run_dir / "checkpoints"),
        seed=cfg.seed,
        data_seed=cfg.seed,
        use_cpu=kwargs.get("use_cpu", False) or not cuda,  # bf16 autocast on CPU needs use_cpu (else "no bf16 GPU")
        dataset_kwargs={"skip_prepare_dataset": True},  # finetune.data already tokenized and masked the rows
        max_length=None,
        logging_nan_inf_filter=False,  # log losses raw; the trainer stops on a non-finite one (trainer.py)
        **tracking.trainer_arguments(cfg, run_dir),  # report_to, run_name (finetune.tracking)
    )
    if cfg.early_stopping_patience and has_eval:  # the best checkpoint becomes the result (validate.py checked the rest)
        kwargs.update(load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=False)
    # distributed=...: the launcher starts the processes; none and ddp need nothing here (transformers runs DDP over
    # whatever processes were launched, NCCL on GPUs, gloo on CPU). use_cpu stays as set above on CPU under DeepSpeed
    # too: it makes accelerate start a gloo group of the right size, and the Accelerator still switches to DeepSpeed.
    if cfg.distributed.backend == "deepspeed":
        kwargs["deepspeed"] = OmegaConf.to_container(cfg.distributed.deepspeed)
    elif cfg.distributed.backend == "fsdp":  # on CPU process groups too (finetune.fsdp)
        kwargs.update(fsdp=True, fsdp_config=OmegaConf.to_container(cfg.distributed.fsdp_config))
    return _checkpointing_renamed(kwargs)


_CHECKPOINTING_NAMES = (("gradient_checkpointing", "activation_checkpointing"),
                        ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs"))


def _checkpointing_renamed(kwargs: dict) -> dict:
    """trainer.gradient_checkpointing(_kwargs): the name users of every other trainer know, and our presets'. Since 5.2x
    transformers calls it activation_checkpointing(_kwargs) and warns on the old name, which v6 removes; hand it over
    under the name the installed TrainingArguments has. A value given under the new name wins, as in transformers."""
    from transformers import TrainingArguments

    fields = TrainingArguments.__dataclass_fields__
    for old, new in _CHECKPOINTING_NAMES:
        if new in fields and old in kwargs:
            value = kwargs.pop(old)
            if kwargs.get(new) is None:
                kwargs[new] = value
    return kwargs


def _start_deepspeed_comm() -> None:
    """On CPU, accelerate starts torch.distributed (gloo) but not deepspeed.comm, and ZeRO-3's zero.Init inside
    from_pretrained then sizes its batch for one process and fails ("train_batch_size ... 8 != 2 * 2 * 1"). This wraps
    the existing process group; on GPUs accelerate has already done it and this is a no-op."""
    import deepspeed

    deepspeed.init_distributed()


def _same_on_every_rank(summary: str) -> None:
    """Ranks that disagree on the config, the data or the checkpoint would train different things (or wait for each
    other forever): compare once, and let every rank stop with the same error."""
    import torch.distributed as dist

    summaries = [None] * dist.get_world_size()
    dist.all_gather_object(summaries, summary)
    if len(set(summaries)) > 1:
        raise ConfigError(f"the ranks of this launch disagree ({'; '.join(f'rank {i}: {s}' for i, s in enumerate(summaries))}); "
                          "every rank must see the same config, data files and run directory")


def _best(state) -> dict:
    """Which checkpoint had the lowest eval loss, and whether early stopping ended the run before max_steps."""
    if state.best_model_checkpoint is None:
        return {}
    return {"best_checkpoint": Path(state.best_model_checkpoint).name, "best_eval_loss": state.best_metric,
            "stopped_early": state.global_step < state.max_steps}


def _early_stopping(cfg, eval_set) -> list:
    from transformers import EarlyStoppingCallback

    if not cfg.early_stopping_patience or eval_set is None:
        return []
    return [EarlyStoppingCallback(cfg.early_stopping_patience, cfg.early_stopping_threshold)]


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
    def numel(p):  # ZeRO-3 partitions parameters to empty tensors; ds_numel is the real size
        return getattr(p, "ds_numel", p.numel())

    trainable = sum(numel(p) for p in model.parameters() if p.requires_grad)
    return trainable, sum(numel(p) for p in model.parameters())


def _preset_name() -> str | None:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().job.config_name if HydraConfig.initialized() else None


def given_overrides() -> list[str]:
    """The command-line overrides of this run (one job's own values in a sweep), as Hydra took them."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def _summary(run_dir: Path, before: dict, after: dict, samples: list[dict], seconds: float) -> None:
    if "eval_loss" in before and "eval_loss" in after:
        b, a = before["eval_loss"], after["eval_loss"]
        cli.say(f"held-out eval loss: {b:.3f} -> {a:.3f} ({(a - b) / b:+.1%}) after {seconds:.0f} s of training")
    for sample in samples:
        cli.say("held-out prompt:\n" + _indent(sample["prompt"]))
        cli.say("before training:\n" + _indent(sample["before"] or "(empty)"))
        cli.say("after training:\n" + _indent(sample["after"] or "(empty)"))
    cli.say(f"run directory: {run_dir}")


def _indent(text: str) -> str:
    return "\n".join(f"    | {line}" for line in text.strip().splitlines())

