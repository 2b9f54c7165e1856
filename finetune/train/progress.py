"""What a run prints while it works: one bar for data preparation, one for training, one line per event.

Why our own and not transformers' ProgressCallback / PrinterCallback: those print every log as a python dict
(`{'loss': '6.194', 'grad_norm': ..., 'entropy': ...}`), open a nested bar for every evaluation (and one more before
and after training), show no token throughput, and redraw with carriage returns into files that are not terminals
(CI, SLURM logs, `| tee`). `TrainingProgress` replaces both in finetune.trainer.GuardedSFTTrainer:

- a terminal on stderr: one tqdm bar over optimizer steps (tqdm's ETA; last loss and tok/s beside it), starting at
  the resumed step, evaluations shown in the bar instead of a bar of their own; `trainer.disable_tqdm=true` turns it
  off;
- anything else: no bar, no redraws; the same lines, with the ETA in them;
- every logging step: `[finetune] step 20/108  loss 5.978  lr 2.88e-03  grad-norm 0.162  1,530 tok/s`;
  every evaluation: `[finetune] eval at step 36: loss 5.91, perplexity 368`; the end:
  `[finetune] trained 108 steps in 72 s (213,488 tokens, 2,965 tok/s)`;
- rank 0 only (`state.is_world_process_zero`).

tok/s counts the non-padding input tokens of every micro-batch (`state.num_input_tokens_seen`, gathered over the
ranks: finetune.trainer counts it with `input_tokens`) per second of training, evaluations and checkpoint saves
left out; a resumed run counts from where it resumed.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator

from transformers import TrainerCallback

from finetune import ranks

PREFIX = "[finetune] "
IGNORE_INDEX = -100


def interactive() -> bool:
    """A bar only where it can redraw in place: stderr is a terminal (and this is rank 0)."""
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty()) and ranks.is_main()


@contextlib.contextmanager
def rows_bar(total: int, what: str = "preparing data") -> Iterator[Callable[[int], None]]:
    """A bar over `total` rows for data preparation; yields `advance(n)` (safe to call from a worker thread).

    On a terminal only, and only once the work has taken 2 s (small data prints nothing); it disappears when done:
    the data lines that follow say what came out."""
    if not interactive() or total <= 0:
        yield lambda n: None
        return
    from tqdm import tqdm

    with tqdm(
        total=total,
        desc=what,
        unit=" rows",
        unit_scale=True,
        file=sys.stderr,
        leave=False,
        delay=2.0,
        mininterval=0.5,
        dynamic_ncols=True,
    ) as bar:
        yield bar.update


def input_tokens(inputs: dict):
    """The non-padding input tokens of one micro-batch (a 0-d tensor or an int).

    With an attention mask (trl's collator), its sum. Packed rows (finetune.data.packing.PackedCollator) have none:
    there the padding is the last "sample" of a row, positions restarting at 0 and no label trained; every real sample
    trains at least one token (its assistant message), so such a tail is padding. Anything else: every token."""
    mask = inputs.get("attention_mask")
    if mask is not None:
        return mask.sum()
    if "input_ids" not in inputs:  # ORPO / SimPO batches: prompt+chosen and prompt+rejected rows
        return sum(inputs[f"{side}_attention_mask"].sum() for side in ("chosen", "rejected"))
    ids, positions, labels = inputs["input_ids"], inputs.get("position_ids"), inputs.get("labels")
    if positions is None or labels is None or positions.dim() != 2 or positions.shape != labels.shape:
        return ids.numel()
    import torch

    width = positions.shape[-1]
    last_start = width - 1 - (positions == 0).flip(-1).int().argmax(-1)  # where each row's last sample begins
    tail = torch.arange(width, device=positions.device) >= last_start[:, None]
    padding = (last_start > 0) & ~((labels != IGNORE_INDEX) & tail).any(-1)
    return ids.numel() - ((width - last_start) * padding).sum()


class TrainingProgress(TrainerCallback):
    """The training bar and the log lines (see the module docstring). `bar=None`: a bar when `interactive()`."""

    def __init__(self, bar: bool | None = None):
        self.want_bar = bar
        self.bar = None  # the training bar, while training
        self.eval_bar = None  # a transient bar for evaluations outside training (terminal only)
        self.training = self.trained = False
        self.evaluated = 0
        self.loss = None

    # -- training -----------------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        self.training, self.trained = True, False
        now = time.perf_counter()
        self.begin = self.mark = self.last_time = now
        self.excluded = self.last_excluded = 0.0  # seconds of evaluation and checkpoint saving
        self.first_step = state.global_step
        self.first_tokens = self.last_tokens = state.num_input_tokens_seen
        self.rate = None
        if not state.is_world_process_zero:
            return
        wanted = interactive() if self.want_bar is None else self.want_bar
        if wanted and not args.disable_tqdm:
            from tqdm import tqdm

            self.bar = tqdm(
                total=state.max_steps,
                initial=state.global_step,
                desc="training",
                unit="step",
                file=sys.stderr,
                dynamic_ncols=True,
                leave=True,
            )
        steps = f"steps {state.global_step + 1}-{state.max_steps}" if state.global_step else f"{state.max_steps} steps"
        processes = f" x {args.world_size} processes" if args.world_size > 1 else ""
        sequences = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        self._say(
            f"training: {steps} of {sequences} sequences (batch {args.per_device_train_batch_size} x accumulation "
            f"{args.gradient_accumulation_steps}{processes})"
        )

    def on_step_end(self, args, state, control, **kwargs):
        self.mark = time.perf_counter()
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)
            rate = self._rate(state, self.mark)
            if rate is not None:
                self.bar.set_postfix_str(self._postfix(rate), refresh=False)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" in logs and self.training:
            now = time.perf_counter()
            rate = self._rate(state, now)
            self.last_time, self.last_tokens, self.last_excluded = now, state.num_input_tokens_seen, self.excluded
            self.rate, self.loss = rate, logs["loss"]
            if not state.is_world_process_zero:
                return
            line = [f"step {state.global_step}/{state.max_steps}", f"loss {logs['loss']:.4g}"]
            if isinstance(logs.get("learning_rate"), (int, float)):
                line.append(f"lr {logs['learning_rate']:.2e}")
            if isinstance(logs.get("grad_norm"), (int, float)):
                line.append(f"grad-norm {logs['grad_norm']:.3g}")
            if "loss_scale" in logs:
                line.append(f"loss-scale {logs['loss_scale']:g}")
            line += _preference(logs, "")
            if rate is not None:
                line.append(f"{rate:,.0f} tok/s")
            if self.bar is None and state.global_step < state.max_steps:
                done = state.global_step - self.first_step
                if done > 0:
                    line.append(f"eta {_duration((state.max_steps - state.global_step) * (now - self.begin) / done)}")
            self._say("  ".join(line))
            if self.bar is not None:
                self.bar.set_postfix_str(self._postfix(rate), refresh=True)
        elif "eval_loss" in logs and state.is_world_process_zero:
            self._end_evaluation()  # the line below, not a bar, is what stays
            if not self.training:
                when = "after training" if self.trained else "before training"
            elif state.global_step == 0:
                when = "before training"
            else:
                when = f"at step {state.global_step}"
            perplexity = logs.get("eval_perplexity")
            ppl = f", perplexity {_number(perplexity)}" if isinstance(perplexity, (int, float)) else ""
            self._say("  ".join([f"eval {when}: loss {logs['eval_loss']:.4g}{ppl}", *_preference(logs, "eval_")]))

    def on_save(self, args, state, control, **kwargs):
        self._exclude_since_step()

    def on_train_end(self, args, state, control, **kwargs):
        end = time.perf_counter()
        self.training, self.trained = False, True
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)
            self.bar.close()
            self.bar = None
        if not state.is_world_process_zero:
            return
        steps = state.global_step - self.first_step
        tokens = state.num_input_tokens_seen - self.first_tokens
        seconds, training = end - self.begin, end - self.begin - self.excluded
        which = f"{steps} steps" if not self.first_step else f"steps {self.first_step + 1}-{state.global_step}"
        rate = f", {tokens / training:,.0f} tok/s" if tokens and training > 0 else ""
        left_out = (
            f" excluding {_duration(self.excluded)} of evaluation and saving" if rate and self.excluded >= 1 else ""
        )
        self._say(f"trained {which} in {_duration(seconds)} ({tokens:,} tokens{rate}{left_out})")

    # -- evaluation ---------------------------------------------------------------------------------------------
    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        if not state.is_world_process_zero:
            return
        self.evaluated += 1
        total = _length(eval_dataloader)
        if self.bar is not None:  # during training: in the training bar, not a nested one
            self.bar.set_postfix_str(f"evaluating {self.evaluated}/{total or '?'}")
        elif self.want_bar is not False and not self.training and not args.disable_tqdm and interactive():
            if self.eval_bar is None:
                from tqdm import tqdm

                self.eval_bar = tqdm(
                    total=total, desc="evaluating", unit="batch", file=sys.stderr, leave=False, dynamic_ncols=True
                )
            self.eval_bar.update(1)

    def on_evaluate(self, args, state, control, **kwargs):
        self._end_evaluation()
        self._exclude_since_step()

    def on_predict(self, args, state, control, **kwargs):
        self._end_evaluation()
        self._exclude_since_step()

    def _end_evaluation(self) -> None:
        self.evaluated = 0
        if self.eval_bar is not None:
            self.eval_bar.close()
            self.eval_bar = None
        if self.bar is not None:
            self.bar.set_postfix_str(self._postfix(self.rate), refresh=False)

    # -- helpers ------------------------------------------------------------------------------------------------
    def close(self) -> None:
        """End the bars' lines (training stopped by an error: the message must not land on the bar)."""
        for bar in (self.bar, self.eval_bar):
            if bar is not None:
                bar.close()
        self.bar = self.eval_bar = None

    def _exclude_since_step(self) -> None:
        """Evaluation and checkpoint saving come after an optimizer step (on_step_end): their time is not training."""
        if self.training:
            now = time.perf_counter()
            self.excluded += now - self.mark
            self.mark = now

    def _rate(self, state, now: float) -> float | None:
        """Tokens per second of training since the last logging step (or the start)."""
        tokens = state.num_input_tokens_seen - self.last_tokens
        seconds = (now - self.last_time) - (self.excluded - self.last_excluded)
        return tokens / seconds if tokens > 0 and seconds > 0 else None

    def _postfix(self, rate: float | None) -> str:
        parts = [f"loss {self.loss:.4g}"] if self.loss is not None else []
        if rate is not None:
            parts.append(f"{rate:,.0f} tok/s")
        return ", ".join(parts)

    def _say(self, message: str) -> None:
        from finetune import console as cli

        cli.transcript(PREFIX + message)
        if self.bar is not None or self.eval_bar is not None:
            from tqdm import tqdm

            tqdm.write(PREFIX + message, file=sys.stderr)
        else:
            print(PREFIX + message, file=sys.stderr, flush=True)


PREFERENCE_METRICS = (  # trl's preference trainers log these (KTO has no accuracy: its data is unpaired)
    ("rewards/chosen", "chosen"),
    ("rewards/rejected", "rejected"),
    ("rewards/margins", "margin"),
    ("rewards/accuracies", "accuracy"),
)


def _preference(logs: dict, prefix: str) -> list[str]:
    """The reward columns of a preference objective's log line (nothing for SFT)."""
    return [
        f"{label} {logs[prefix + key]:.3g}"
        for key, label in PREFERENCE_METRICS
        if isinstance(logs.get(prefix + key), float)
    ]


def _length(loader) -> int | None:
    try:
        return len(loader) if loader is not None else None
    except TypeError:
        return None


def _number(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 90:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"
