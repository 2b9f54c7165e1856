"""The closing lines of a run: what it did to the held-out numbers and samples, in words a user reads at the end."""

from __future__ import annotations

from pathlib import Path

from finetune import console as cli

# a preference objective's held-out numbers (trl's names; KTO has no accuracy: its rows are unpaired)
PREFERENCE_LINES = (  # trl's key, our name (run.json, the card), what it means
    ("rewards/accuracies", "preference accuracy", "chosen scored above rejected"),
    ("rewards/margins", "reward margin", "chosen - rejected"),
)


def final_evaluation(trainer) -> dict:
    """The held-out metrics the training loop logged at its last step (eval_strategy=epoch ends every run with one),
    when the weights it measured are the final ones: no best checkpoint was loaded back over them. {}: evaluate."""
    state, args = trainer.state, trainer.args
    last = next((h for h in reversed(state.log_history) if "eval_loss" in h), None)
    if last is None or last.get("step") != state.global_step:
        return {}
    best = state.best_model_checkpoint
    if args.load_best_model_at_end and best and not best.endswith(f"checkpoint-{state.global_step}"):
        return {}
    return {k: v for k, v in last.items() if k.startswith("eval_") or k == "epoch"}


def preference_record(objective: str, before: dict, after: dict) -> dict:
    """run.json's `preference_eval` (the card's table): the held-out reward numbers before and after training."""
    metrics = {
        label: {"before": before.get(f"eval_{key}"), "after": after[f"eval_{key}"]}
        for key, label, _ in PREFERENCE_LINES
        if f"eval_{key}" in after
    }
    return {"preference_eval": {"objective": objective, "metrics": metrics}} if objective != "sft" else {}


def closing_lines(run_dir: Path, measured, note: str | None = None) -> None:
    """The closing lines: the held-out loss before -> after, each sample generation before and after, and a note on
    what such a run can show (a tiny base: that fine-tuning worked, not knowledge)."""
    before, after = measured.eval_before, measured.eval_after
    if "eval_loss" in before and "eval_loss" in after:
        b, a = before["eval_loss"], after["eval_loss"]
        seconds = measured.train_seconds
        cli.say(f"held-out eval loss: {b:.3f} -> {a:.3f} ({(a - b) / b:+.1%}) after {seconds:.0f} s of training")
    for key, label, meaning in PREFERENCE_LINES:
        if f"eval_{key}" in after:
            was = f"{before[f'eval_{key}']:.3f} -> " if f"eval_{key}" in before else ""
            cli.say(f"held-out {label} ({meaning}): {was}{after[f'eval_{key}']:.3f}")
    penalty = measured.decoding["repetition_penalty"]
    decoding = "greedy decoding" + (f", repetition_penalty={penalty:g}" if penalty != 1 else "")
    for i, sample in enumerate(measured.samples, 1):
        cli.say(f"held-out prompt (row {i} of the held-out set; {decoding}):\n" + _indent(sample["prompt"]))
        cli.say("before training:\n" + _indent(sample["before"] or "(empty)"))
        cli.say("after training:\n" + _indent(sample["after"] or "(empty)"))
    if note:
        cli.say(note)
    cli.say(f"run directory: {run_dir}")


def _indent(text: str) -> str:
    return "\n".join(f"    | {line}" for line in text.strip().splitlines())
