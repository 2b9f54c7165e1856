"""run(cfg): one training run, told in the order it happens (`_run`): find the checkpoint to resume, open run.json
(finetune.runs.record: it also records how the run ends), then the phases: prepare data -> training arguments -> load
model -> build trainer -> measure before -> train -> measure after -> save results. Each phase takes the run's
context (`Run`: one view of the config, the run directory, the checkpoint it resumes, run.json, the preemption flag)
and returns what later phases need. trl's SFTTrainer owns the loop (with our guards: finetune.train.trainer); what
matters here is the order:
- every config problem is reported before any weights are read;
- data is tokenized before the model loads, so bad rows fail in seconds, not after a 40 GB load;
- SFTConfig (TrainingArguments) is built before `from_pretrained`: under DeepSpeed ZeRO-3 that is what makes
  transformers shard the weights while loading instead of materialising the whole model on every rank;
- run.json is written before anything can fail, says at every exit how the run ended (errors.py's codes), and says
  "completed" only once the final weights' card and manifest are written.

Distributed runs (finetune.train.launch): every rank runs this same function on the same `output_dir`; only rank 0
writes run files (finetune.ranks before the trainer exists, `is_world_process_zero` after).
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from finetune import console as cli
from finetune import ranks
from finetune.adapters import card
from finetune.config import precision
from finetune.config.validate import validate
from finetune.data import packing
from finetune.data import templates as data_templates
from finetune.data.tokenize import PreparedData, prompt_text
from finetune.errors import ConfigError, FinetuneError, Preempted
from finetune.models import fingerprint, strategy, tiny
from finetune.models import load as models
from finetune.runs import artifacts, checkpoints, record, report, rundir, runlock
from finetune.runs.phases import PhaseClock
from finetune.train import guards, launch, objectives, oom, summary, tracking

if TYPE_CHECKING:
    from trl import SFTConfig

    from finetune.runs.record import RunRecord
    from finetune.train.trainer import GuardedSFTTrainer

LOG_FILE = "train.log"  # the run's log: our lines (cli.transcript) and, through Hydra's job logging, library warnings


def run(cfg: DictConfig) -> Path:
    """Train as configured (or resume); return the run directory. Raises FinetuneError subclasses (exit codes)."""
    cli.new_transcript()
    if ranks.is_main():  # before validation logs a line: a run refused for the lock writes nothing (finetune.runlock)
        problem = _held(cfg)
        if problem:
            raise ConfigError(problem)
    cfg, precision_used = _validated(cfg)
    run_dir = Path(cfg.output_dir).expanduser()
    if cfg.resume and record.already_complete(run_dir, cli.say):  # nothing to do: nothing is written, not even the lock
        return run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    with runlock.RunLock(run_dir, enabled=ranks.is_main(), say=cli.say):  # one run per output_dir, for its lifetime
        if ranks.is_main():
            cli.log_to(run_dir / LOG_FILE)  # our lines, also those said above, for post-mortems
        try:
            return _run(cfg, run_dir, precision_used)
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


def _validated(cfg: DictConfig) -> tuple[DictConfig, str]:
    """Every config problem at once, before any weights are read; then `auto` precision chosen, before the config is
    hashed and written (it records what ran). Returns the resolved config and the precision line for run.json."""
    resolved, warnings = validate(cfg)
    for warning in warnings:
        cli.say(f"warning: {warning}")
    bf16, why = precision.choose()
    chosen = precision.resolve(resolved, bf16)
    precision_used = f"{precision.describe(resolved)} ({why if chosen else 'as configured'})"
    cli.say(f"precision: {precision_used}")
    return OmegaConf.create(resolved), precision_used


def _run(cfg: DictConfig, run_dir: Path, precision_used: str) -> Path:
    """The run, once rank 0 holds output_dir's lock: where it starts (a checkpoint, or step 0), then its phases in
    order, inside the record of how it ends (run.json: finetune.runs.record)."""
    cli.quiet_libraries()
    resume_from = record.resume_checkpoint(cfg.resume, run_dir, cli.say) if cfg.resume else None
    if resume_from == "completed":
        return run_dir
    if ranks.is_main():  # the other ranks share this run directory and write nothing here
        if resume_from is None:  # a fresh run (overwrite=true): old checkpoints would resume or rotate wrongly
            runlock.clear_for_fresh_run(run_dir / "checkpoints", cfg.allow_foreign_files, cli.say)  # ours only
        checkpoints.clear_staging(run_dir / "checkpoints")
    at_start = record.fields_at_start(cfg, run_dir, resume_from, _preset_name(), given_overrides(), precision_used)
    with (
        guards.PreemptionSignals(deferred=ranks.world_size() > 1) as signals,
        launch.closed_on_error(),  # outside run_record: run.json says how the run ended first
        record.run_record(run_dir, enabled=ranks.is_main(), **at_start) as run_json,
        tracking.session(cfg, run_dir, _preset_name(), resuming=resume_from is not None),  # report_to's, this run only
        oom.explained(cfg, run_dir / "checkpoints"),
    ):
        run = Run(cfg, run_dir, resume_from, run_json, signals)
        inputs = run.clock.timed("data", _prepare_data, run)  # run.json's phase_seconds: where the time went
        arguments = run.clock.timed("arguments", _arguments, run, inputs)
        model = run.clock.timed("model", _load_model, run, inputs)
        trainer = run.clock.timed("trainer", _build_trainer, run, inputs, arguments, model)
        measured = run.clock.timed("before", _measure_before, run, inputs, trainer)
        run.clock.timed("train", _train, run, trainer, measured)
        run.clock.timed("after", _measure_after, run, inputs, trainer, measured)
        _save_results(run, inputs, trainer, measured)
    launch.leave_process_group(wait=True)
    return run_dir


@dataclass
class Run:
    """What every phase of one run shares."""

    cfg: DictConfig  # the resolved config (validate()'s, precision chosen): the one view of it
    run_dir: Path
    resume_from: Path | None  # the checkpoint this run continues; None: step 0
    record: RunRecord  # run.json; run_record writes how the run ends
    signals: guards.PreemptionSignals  # the preemption signal received, if any
    clock: PhaseClock = field(default_factory=PhaseClock)  # seconds per phase, from the process's start

    @cached_property
    def resolved(self) -> dict:
        """cfg as plain dicts and lists, the values validate() returned (cfg was made from them): what the run hashes,
        writes to config.yaml and the card, and hands to peft and the fingerprints. One object for the whole run."""
        return OmegaConf.to_container(self.cfg)

    @property
    def strategy(self) -> dict:
        return self.resolved["strategy"]

    @property
    def checkpoints_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def stop_if_signalled(self, phase: str) -> None:
        """Before the first optimizer step there is nothing to commit: a preemption signal stops the run at the next
        safe point of whatever it is doing (data, loading, the measurements before training), not after a step."""
        if self.signals.received:
            raise Preempted(guards.before_training(self.signals.received, phase))


@dataclass
class Inputs:
    """What the data phase hands on: the tokenizer and template the rows were rendered with, the tokenized rows, and
    the fingerprints of the base and the data (run.json, every checkpoint's manifest, the resume drift check)."""

    tokenizer: Any
    template: data_templates.Template
    data: PreparedData
    train_set: Any
    eval_set: Any | None
    base_folder: Path | None  # the base's local files (None: not found locally)
    base_print: str
    data_print: str


@dataclass
class Arguments:
    """What the training-arguments phase settles, before any weights load."""

    args: SFTConfig
    keep_checkpoints: int | None  # trainer.save_total_limit: rotation is ours, after each commit (trainer.py)
    facts: dict  # what must not change between a checkpoint and the run that resumes it (its manifest records them)


@dataclass
class Measurements:
    """The numbers a run reports (metrics.json, samples.json, run.json, the closing summary), filled in by the phases
    in order: the untouched base before training, the training itself, the trained model after."""

    prompts: list[str]  # the first sample_generations held-out rows (in the held-out set's order), before and after
    decoding: dict  # generate()'s settings for them (greedy), recorded in samples.json
    eval_before: dict = field(default_factory=dict)
    before: list[str] = field(default_factory=list)
    result: Any = None  # trainer.train()'s TrainOutput
    train_seconds: float = 0.0
    eval_after: dict = field(default_factory=dict)
    after: list[str] = field(default_factory=list)

    @property
    def samples(self) -> list[dict]:
        return [{"prompt": p, "before": b, "after": a} for p, b, a in zip(self.prompts, self.before, self.after)]


def _prepare_data(run: Run) -> Inputs:
    """Data before the model: bad rows fail in seconds, not after a 40 GB load. The tokenizer takes the data
    template's chat template (saved with it: inference renders as training did). Tokenizing runs to its end, then a
    preemption signal stops the run. run.json learns the data accounting and the fingerprints of base and data."""
    from transformers import set_seed

    from finetune.train.progress import rows_bar

    cfg = run.cfg
    set_seed(cfg.seed)
    models.ensure_available(cfg.model)
    tokenizer = models.load_tokenizer(cfg.model)
    template = data_templates.load(cfg.data.template)
    tokenizer.chat_template = template.chat_template  # saved with the tokenizer: inference renders as training did
    batch_size = cfg.trainer.get("per_device_train_batch_size", 8)
    data = objectives.prepare(cfg, tokenizer, template, progress=rows_bar, batch_size=batch_size)  # SFT or pairs
    run.stop_if_signalled("data preparation")  # tokenizing runs to its end (seconds), then nothing else starts
    train_set, eval_set = data.as_datasets()
    for line in objectives.describe(cfg, data):
        cli.say(line)
    if data.not_kept and ranks.is_main():
        artifacts.write_jsonl(run.run_dir / "rejected_rows.jsonl", [n.as_dict() for n in data.not_kept])
        cli.say(f"rows that will not train, with reasons: {run.run_dir / 'rejected_rows.jsonl'}")
    base_folder = fingerprint.model_files(cfg.model)
    unavailable = f"unavailable:{cfg.model.name_or_path}@{cfg.model.revision}"
    base_print = fingerprint.base_model(base_folder) if base_folder else unavailable
    data_print = fingerprint.dataset(data.train + data.eval, data.packed is not None)
    run.record.update(data=data.accounting, dataset_fingerprint=data_print, base_model_fingerprint=base_print)
    return Inputs(tokenizer, template, data, train_set, eval_set, base_folder, base_print, data_print)


def _arguments(run: Run, inputs: Inputs) -> Arguments:
    """trl's SFTConfig, built before `from_pretrained`: under DeepSpeed ZeRO-3 that is what makes transformers shard
    the weights while loading instead of materialising the whole model on every rank. Building it starts a
    distributed launch's process group: from then on a preemption signal is ours to handle (PreemptionSignals.arm)."""
    import torch

    cfg = run.cfg
    has_eval = inputs.eval_set is not None
    training_args = _training_arguments(cfg, run.run_dir, has_eval=has_eval, cuda=torch.cuda.is_available())
    keep_checkpoints = training_args.pop("save_total_limit", None)
    args = objectives.training_config(cfg, {**training_args, "save_total_limit": None})  # rotation: trainer.py
    distributed = args.world_size > 1  # the process group exists from here on
    run.signals.arm()
    if distributed and cfg.distributed.backend == "deepspeed":
        launch.start_deepspeed_comm()
    facts = _agreed_facts(run, inputs, args)  # the ranks agree, a resume continues the same run
    return Arguments(args, keep_checkpoints, facts)


def _agreed_facts(run: Run, inputs: Inputs, args: SFTConfig) -> dict:
    """Before any weights load, this run must be one run: every rank of a launch on the same config, data and
    checkpoint; a resume continuing the run its checkpoint recorded (but for the fields resume_allow_drift names).
    config.yaml and data_template.yaml then record what runs. Returns the facts each checkpoint's manifest records."""
    cfg = run.cfg
    if args.world_size > 1:
        launch.same_on_every_rank(
            f"config {artifacts.config_hash(run.resolved)[:12]}, data {inputs.data_print[:12]}, "
            f"resume from {run.resume_from.name if run.resume_from else 'step 0'}"
        )
    facts = fingerprint.run_facts(cfg, run.strategy, inputs.base_print, inputs.data_print, args.world_size)
    if run.resume_from is not None:
        record.check_drift(run.resume_from, facts, list(cfg.resume_allow_drift), inputs.base_folder)
    if ranks.is_main():
        artifacts.write_config(run.run_dir, run.resolved, inputs.template.path)
    run.stop_if_signalled("fingerprinting the base and the data")
    return facts


def _load_model(run: Run, inputs: Inputs):
    """The weights, read only once everything that can be refused has been (out of memory while loading: the fixes
    for the load's peak). Packed rows: a probe checks that this model keeps the samples sharing a row apart."""
    cfg = run.cfg
    with oom.explained(cfg, run.checkpoints_dir, loading=True):
        model = models.load_model(cfg.model, inputs.tokenizer, strategy.quantization(run.strategy))
    run.stop_if_signalled("loading the model")
    if inputs.data.packed is not None:
        model.config.use_cache = False  # a KV cache turns off transformers' packed-sequence masks
        leak = packing.verify_isolation(model, model.config.vocab_size, cfg.data.max_length)
        cli.say(f"packing: samples isolated in this model (probe difference {leak:.1e})")
    return model


def _build_trainer(run: Run, inputs: Inputs, arguments: Arguments, model) -> GuardedSFTTrainer:
    """trl's SFTTrainer with our guards (finetune.train.trainer): checkpoints committed with a manifest of the run's
    facts, rotated by us and cleaned to be shareable (no pickles, no local paths); train_steps.jsonl, which proves a
    resume exact; the preemption, early-stopping and tracking callbacks. run.json learns the optimizer and the
    parameter counts; a disk that cannot hold two checkpoints is refused now, not at the first save."""
    from finetune.train import deepspeed_probe
    from finetune.train.trainer import estimate_checkpoint_bytes

    deepspeed_probe.answer_without_importing()

    cfg, args = run.cfg, arguments.args
    model, peft_config = objectives.starting_point(cfg, model, run.strategy)  # init_from: that run's adapter
    collator = packing.PackedCollator(inputs.tokenizer.pad_token_id) if inputs.data.packed is not None else None
    public_base = _public_name(cfg.model)
    resume_step = checkpoints.step_of(run.resume_from) if run.resume_from else 0
    step_log = guards.StepLog(run.run_dir / "train_steps.jsonl", resume_step, enabled=args.should_save)
    reference = objectives.reference_model(cfg, inputs.tokenizer, strategy.quantization(run.strategy))
    trainer = objectives.trainer_class(cfg)(
        model=model,
        **({"ref_model": reference} if reference is not None else {}),
        args=args,
        train_dataset=inputs.train_set,
        eval_dataset=inputs.eval_set,
        processing_class=inputs.tokenizer,
        data_collator=collator,
        peft_config=peft_config,
        callbacks=[
            guards.StopOnPreemption(run.signals),
            guards.StopBeforeTraining(run.signals),
            guards.FlushStepLog(step_log),
            *_early_stopping(cfg, inputs.eval_set),
            *tracking.callbacks(args.report_to),
        ],
        keep_checkpoints=arguments.keep_checkpoints,
        run_facts=arguments.facts,
        step_log=step_log,
        after_save=lambda folder: artifacts.clean_weights_folder(
            folder, args, models.local_path(cfg.model), public_base
        ),
        loraplus_lr_ratio=run.strategy.get("loraplus_lr_ratio"),  # LoRA+: B matrices at lr x ratio (trainer.py)
    )
    optimizer = {"name": str(getattr(args.optim, "value", args.optim))}
    if loraplus := run.strategy.get("loraplus_lr_ratio"):
        optimizer["loraplus_lr_ratio"] = loraplus
    run.record.update(optimizer=optimizer)
    trainable, total = _count_parameters(trainer.model)
    cli.say(
        f"model: {cfg.model.name_or_path} ({cfg.model.family}), {cfg.strategy.name}: {trainable:,} of {total:,} "
        f"parameters train ({trainable / total:.2%})"
    )
    run.record.update(trainable_parameters=trainable, total_parameters=total)
    _check_free_space(run.run_dir, estimate_checkpoint_bytes(trainer.model), args)
    return trainer


def _measure_before(run: Run, inputs: Inputs, trainer: GuardedSFTTrainer) -> Measurements:
    """The untouched base, the "before" of the comparison: its held-out loss (eval_before_training) and its sample
    generations (sample_generations). A preemption signal stops the run between them: nothing has trained yet.
    A distributed launch measures inside train() instead (_measure_in_loop)."""
    cfg = run.cfg
    rows = inputs.data.eval_rows[: cfg.sample_generations]
    greedy = dict(do_sample=False, max_new_tokens=cfg.max_new_tokens, repetition_penalty=cfg.sample_repetition_penalty)
    measured = Measurements([prompt_text(inputs.tokenizer, inputs.template, row) for row in rows], greedy)

    def measure_base() -> None:
        if inputs.eval_set is not None and cfg.eval_before_training:  # StopBeforeTraining ends it at a signal
            measured.eval_before.update(trainer.evaluate(metric_key_prefix="eval"))
        for prompt in measured.prompts:
            run.stop_if_signalled("the sample generations before training")
            measured.before.append(_generate(trainer.model, inputs.tokenizer, prompt, measured.decoding))

    if trainer.args.world_size > 1:
        _measure_in_loop(run, trainer, measured, measure_base)
    else:
        measure_base()
        run.stop_if_signalled("the measurements before training")
    return measured


def _measure_in_loop(run: Run, trainer: GuardedSFTTrainer, measured: Measurements, measure_base: Callable) -> None:
    """trainer.evaluate() before trainer.train() breaks distributed training in transformers 5.23 + accelerate 1.15.
    DDP: evaluate() marks the bare model as prepared, train() then skips the DDP wrapper, gradients are never averaged
    and the ranks silently train apart (measured: adapter 0.039 off a single-process run, vs 5e-6 without it).
    DeepSpeed: train() finds evaluate()'s inference engine and fails in backward. So the base is measured inside
    train(), once the model is wrapped, before the first step, with the adapter switched off (the untouched base also
    on a resume). A resumed full fine-tune holds the checkpoint's weights by then."""
    full = run.cfg.strategy.name == "full"
    # DPO/KTO switch the adapter off for their reference themselves, and switch it back on when done: nested in ours,
    # that would measure the policy. Before the first step the policy is the reference anyway.
    keep_adapter = full or (objectives.is_preference(run.cfg) and not objectives.spec(run.cfg).reference_free)

    def measure_base_in_loop() -> None:
        if full and run.resume_from is not None:
            cli.say(
                "before-training numbers: not measured on a resumed distributed full fine-tune "
                "(the weights are the checkpoint's)"
            )
            return
        with trainer.model.disable_adapter() if not keep_adapter else contextlib.nullcontext():
            measure_base()
        if measured.eval_before:  # a baseline, not a point of this run's curve (single-process runs: a fresh log)
            trainer.state.log_history.pop()

    trainer.add_callback(guards.OnTrainBegin(measure_base_in_loop))


def _train(run: Run, trainer: GuardedSFTTrainer, measured: Measurements) -> None:
    """trl's loop, from run.resume_from when there is one. A preemption signal during training stops after that
    optimizer step, with a committed checkpoint: Preempted (exit 75); the same command with resume=true continues."""
    cfg = run.cfg
    started = time.perf_counter()
    with oom.explained(cfg, run.checkpoints_dir, step=lambda: trainer.state.global_step):
        measured.result = trainer.train(resume_from_checkpoint=str(run.resume_from) if run.resume_from else None)
    measured.train_seconds = time.perf_counter() - started
    if cfg.distributed.backend == "fsdp":
        from finetune.train import fsdp

        run.record.update(fsdp_sharded_parameters=fsdp.sharded_parameters(trainer.model_wrapped))
    if run.signals.received:
        raise Preempted(
            f"{run.signals.received}: stopped at step {trainer.state.global_step} with a committed checkpoint in "
            f"{run.checkpoints_dir}; run the same command with resume=true to continue"
        )


def _measure_after(run: Run, inputs: Inputs, trainer: GuardedSFTTrainer, measured: Measurements) -> None:
    """The trained model on the held-out rows and prompts the base was measured on (on every rank: they all take
    part in a distributed evaluation). An evaluation the loop already ran on the final weights is not run again."""
    if inputs.eval_set is not None:
        measured.eval_after = summary.final_evaluation(trainer) or trainer.evaluate(metric_key_prefix="eval")
    measured.after = [_generate(trainer.model, inputs.tokenizer, p, measured.decoding) for p in measured.prompts]


def _save_results(run: Run, inputs: Inputs, trainer: GuardedSFTTrainer, measured: Measurements) -> None:
    """The final weights, adapter/ or model/ (every rank: save_model gathers ZeRO-3 / FSDP shards; adapter only for
    PEFT models). Then rank 0 makes the folder shareable as every checkpoint is, and writes the base it needs,
    metrics.json, loss.png, samples.json, run.json's results, the card, and the manifest that seals the folder (merge,
    generate, evaluate and push verify it). Completed only then: a run killed while writing its card or manifest is
    still "running", and resume finishes it."""
    cfg, run_dir = run.cfg, run.run_dir
    weights_dir = run_dir / (rundir.ADAPTER_DIR if cfg.strategy.name != "full" else rundir.MODEL_DIR)
    trainer.save_model(str(weights_dir))  # gathers ZeRO-3 / FSDP shards; adapter only for PEFT models
    if not trainer.is_world_process_zero():
        return
    trainer.after_save(weights_dir)  # as every checkpoint (_build_trainer): no pickled arguments, no local paths
    base = fingerprint.base_record(
        cfg.model, inputs.base_folder, models.hub_id(cfg.model), inputs.base_print, strategy.quantization(run.strategy)
    )
    artifacts.write_json(weights_dir / rundir.BASE_RECORD, base)
    history, result = trainer.state.log_history, measured.result
    before, after = measured.eval_before, measured.eval_after
    artifacts.write_metrics(run_dir, history, eval_before=before, eval_after=after, train=result.metrics)
    artifacts.plot_loss(run_dir, history, before.get("eval_loss"))
    artifacts.write_json(run_dir / "samples.json", {"samples": measured.samples, "decoding": measured.decoding})
    run.record.update(
        train_seconds=round(measured.train_seconds, 2),
        global_steps=result.global_step,
        train_loss=result.training_loss,
        eval_loss_before=before.get("eval_loss"),
        eval_loss_after=after.get("eval_loss"),
        **summary.preference_record(objectives.name(cfg), before, after),
        **_best(trainer.state),
        weights_manifest=f"{weights_dir.name}/{checkpoints.MANIFEST}",  # a folder missing it is refused
        phase_seconds=run.clock.seconds,  # the rest of the wall time: saving these results, and exiting
    )
    card.write(weights_dir, run_dir, run.resolved, "adapter" if weights_dir.name == rundir.ADAPTER_DIR else "model")
    checkpoints.seal(weights_dir, weights_dir.name)  # merge, generate, evaluate and push verify it
    run.record.complete()  # only now: a run killed while writing its card or manifest is still "running"
    report.refresh(run_dir)  # report.html, the run on one page; a failure is said, the run stays completed
    summary.closing_lines(run_dir, measured, tiny.WHAT_IT_SHOWS if cfg.model.tiny else None)


def _check_free_space(run_dir: Path, checkpoint_bytes: int, args) -> None:
    free = shutil.disk_usage(run_dir).free
    if args.save_strategy != "no" and free < 2 * checkpoint_bytes:
        raise ConfigError(
            f"output_dir: {free / 2**20:.1f} MiB free on the device of {run_dir}, but one checkpoint needs about "
            f"{checkpoint_bytes / 2**20:.1f} MiB (twice that is required to replace one safely); free space or "
            "choose another output_dir"
        )


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
    if cfg.early_stopping_patience and has_eval:  # the best checkpoint is the result (validate.py checked the rest)
        kwargs.update(load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=False)
    # distributed=...: the launcher starts the processes; none and ddp need nothing here (transformers runs DDP over
    # whatever processes were launched, NCCL on GPUs, gloo on CPU). use_cpu stays as set above on CPU under DeepSpeed
    # too: it makes accelerate start a gloo group of the right size, and the Accelerator still switches to DeepSpeed.
    if cfg.distributed.backend == "deepspeed":
        kwargs["deepspeed"] = OmegaConf.to_container(cfg.distributed.deepspeed)
    elif cfg.distributed.backend == "fsdp":  # on CPU process groups too (finetune.fsdp)
        kwargs.update(fsdp=True, fsdp_config=OmegaConf.to_container(cfg.distributed.fsdp_config))
    return _checkpointing_renamed(kwargs)


_CHECKPOINTING_NAMES = (
    ("gradient_checkpointing", "activation_checkpointing"),
    ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs"),
)


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


def _best(state) -> dict:
    """Which checkpoint had the lowest eval loss, and whether early stopping ended the run before max_steps."""
    if state.best_model_checkpoint is None:
        return {}
    return {
        "best_checkpoint": Path(state.best_model_checkpoint).name,
        "best_eval_loss": state.best_metric,
        "stopped_early": state.global_step < state.max_steps,
    }


def _early_stopping(cfg, eval_set) -> list:
    from transformers import EarlyStoppingCallback

    if not cfg.early_stopping_patience or eval_set is None:
        return []
    return [EarlyStoppingCallback(cfg.early_stopping_patience, cfg.early_stopping_threshold)]


def _generate(model, tokenizer, prompt: str, decoding: dict) -> str:
    """Continuation of a prompt (the completion only) with generate()'s `decoding` settings (Measurements.decoding)."""
    import torch

    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").to(model.device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model.generate(**ids, **decoding, pad_token_id=tokenizer.pad_token_id)
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
