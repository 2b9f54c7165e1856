"""What a run prints: one line per log / evaluation / end of training, tok/s that counts the real tokens, no dict
logs, no bar redraws or library warnings in a log file (finetune.progress)."""

from __future__ import annotations

import json
import re
import time

import pytest
import torch

from finetune.data import packing
from finetune.data.tokenize import IGNORE_INDEX, Sample
from finetune.train.progress import TrainingProgress, input_tokens

from helpers import PROJECT, run_cli, tiny_overrides

DEMO = PROJECT / "finetune" / "demo_data" / "legal_medical_qa.jsonl"

STEP_LINE = re.compile(r"^\[finetune\] step (\d+)/(\d+)  loss ([\d.]+)  lr [\d.e+-]+  grad-norm [\d.]+  ([\d,]+) tok/s")
SUMMARY = re.compile(
    r"^\[finetune\] trained (\d+) steps in (\d+) s \(([\d,]+) tokens, ([\d,]+) tok/s(?: excluding (\d+) s)?"
)


def _number(text: str) -> int:
    return int(text.replace(",", ""))


def test_a_run_in_a_log_file_prints_one_line_per_event_and_counts_every_token(tiny_models, tmp_path):
    """stderr is a pipe here (CI, SLURM, `| tee`): the lines and no bar. One epoch of packed rows under gradient
    accumulation 2 (the last step has one micro-batch): tok/s counts exactly the data's tokens, padding left out."""
    data = tmp_path / "rows.jsonl"  # 40 demo rows: 36 train (18 packed rows of 512, 5 steps) + 4 held out
    data.write_text("".join(line + "\n" for line in DEMO.read_text(encoding="utf-8").splitlines()[:40]))
    run_dir = tmp_path / "run"
    out = run_cli(
        *tiny_overrides(
            "neo",
            tiny_models["neo"],
            run_dir,
            f"data.path={data}",
            "data.eval_path=null",
            "data.packing=true",
            "data.max_length=512",
            "trainer.max_steps=-1",
            "trainer.num_train_epochs=1",
            "trainer.per_device_train_batch_size=2",
            "trainer.gradient_accumulation_steps=2",
            "sample_generations=0",
        )
    )
    assert out.returncode == 0, out.stderr[-3000:]
    record = json.loads((run_dir / "run.json").read_text())
    steps = record["global_steps"]
    lines = out.stderr.splitlines()

    logged = [STEP_LINE.match(line) for line in lines if line.startswith("[finetune] step ")]
    assert all(logged) and [int(m[1]) for m in logged] == list(range(2, steps + 1, 2))
    assert all(int(m[2]) == steps and _number(m[4]) > 0 for m in logged)
    assert any(line.startswith("[finetune] eval before training: loss ") and ", perplexity " in line for line in lines)
    assert any(line.startswith(f"[finetune] eval at step {steps}: loss ") for line in lines)
    assert any(
        line.startswith(f"[finetune] training: {steps} steps of 4 sequences (batch 2 x accumulation 2)")
        for line in lines
    )

    summary = [SUMMARY.match(line) for line in lines if line.startswith("[finetune] trained ")]
    assert len(summary) == 1 and summary[0], lines
    trained_steps, seconds, tokens, rate = (_number(summary[0][i]) for i in (1, 2, 3, 4))
    left_out = _number(summary[0][5] or "0")
    assert trained_steps == steps
    assert tokens == record["data"]["train_tokens"]  # one epoch: every packed token once, no padding
    assert tokens / (seconds + 1) <= rate <= tokens / max(seconds - left_out - 1, 0.1)

    everything = out.stdout + out.stderr
    assert "{'loss'" not in everything and "{'eval_loss'" not in everything and "\r" not in everything
    for noise in ("[WARNING]", "Warning:", "FutureWarning", "UserWarning", "%|"):
        assert noise not in everything, noise


def test_packed_and_padded_batches_count_only_real_tokens():
    """PackedCollator pads a row with a "sample" of pad ids (pad = EOS here, also a trained token), positions from 0."""
    eos = 2
    lengths = [1, 5, 9, 17, 30, 3, 12, 40, 7]
    samples = []
    for i, n in enumerate(lengths):
        ids = [(7 * i + j) % 50 + 3 for j in range(n - 1)] + [eos]
        # a masked prompt, a trained answer ending in EOS
        labels = [IGNORE_INDEX] * ((n - 1) // 2) + ids[(n - 1) // 2 :]
        samples.append(Sample(ids, labels, f"row {i}"))
    rows = packing.pack(samples, max_length=48)
    for multiple in (None, 16):
        collate = packing.PackedCollator(pad_token_id=eos, pad_to_multiple_of=multiple)
        batches = [
            collate(
                [
                    {"input_ids": r.input_ids, "labels": r.labels, "position_ids": r.position_ids}
                    for r in rows[i : i + 3]
                ]
            )
            for i in range(0, len(rows), 3)
        ]
        assert any(
            b["input_ids"].numel() > sum(len(r.input_ids) for r in rows[i * 3 : i * 3 + 3])
            for i, b in enumerate(batches)
        )
        assert sum(int(input_tokens(b)) for b in batches) == sum(lengths)

    padded = {
        "input_ids": torch.tensor([[5, 6, 7, 2, 2], [5, 6, 2, 2, 2]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]]),
    }
    assert int(input_tokens(padded)) == 7  # trl's collator: the attention mask


def _drive(callback, args, *, steps=3, step_seconds=0.1, tokens_per_step=100, eval_seconds=0.0, start=0, zero=True):
    from transformers import TrainerControl, TrainerState

    state = TrainerState(
        global_step=start, max_steps=start + steps, is_world_process_zero=zero, is_local_process_zero=zero
    )
    control = TrainerControl()
    callback.on_train_begin(args, state, control)
    for _ in range(steps):
        time.sleep(step_seconds)
        state.global_step += 1
        state.num_input_tokens_seen += tokens_per_step
        callback.on_step_end(args, state, control)
        callback.on_log(args, state, control, logs={"loss": 2.5, "learning_rate": 1e-3, "grad_norm": 0.5})
        if eval_seconds:
            for _ in range(2):
                callback.on_prediction_step(args, state, control, eval_dataloader=[0, 1])
            time.sleep(eval_seconds)
            callback.on_log(args, state, control, logs={"eval_loss": 2.0, "eval_perplexity": 7.389})
            callback.on_evaluate(args, state, control, metrics={})
    callback.on_train_end(args, state, control)


@pytest.fixture
def training_args(tmp_path):
    from transformers import TrainingArguments

    return lambda **kw: TrainingArguments(
        output_dir=str(tmp_path),
        use_cpu=True,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        report_to="none",
        **kw,
    )


def test_tokens_per_second_leaves_evaluation_out_and_the_bar_follows_the_steps(training_args, capsys):
    _drive(TrainingProgress(bar=True), training_args(disable_tqdm=False), steps=3, step_seconds=0.1, eval_seconds=0.6)
    err = capsys.readouterr().err
    assert "\r" in err and "3/3" in err  # the bar, drawn on a terminal
    lines = [line.rpartition("\r")[2] for line in err.splitlines()]
    assert "[finetune] training: 3 steps of 8 sequences (batch 4 x accumulation 2)" in lines
    assert "[finetune] eval at step 2: loss 2, perplexity 7.389" in lines
    rates = [_number(m[4]) for m in map(STEP_LINE.match, lines) if m]
    assert len(rates) == 3 and all(400 <= r <= 1000 for r in rates)  # 100 tokens per 0.1 s; 0.6 s of eval left out
    summary = [m for m in map(SUMMARY.match, lines) if m]
    assert summary and summary[0][3] == "300" and 400 <= _number(summary[0][4]) <= 1000 and summary[0][5]


def test_no_bar_when_disabled_or_not_a_terminal_and_silence_off_rank_zero(training_args, capsys):
    _drive(TrainingProgress(bar=True), training_args(disable_tqdm=True), steps=2, step_seconds=0, start=4)
    err = capsys.readouterr().err
    assert "\r" not in err and "%|" not in err
    # resumed at 4
    assert "[finetune] training: steps 5-6 of 8 sequences" in err and "[finetune] trained steps 5-6 in " in err
    # no bar: the ETA in the line
    assert "[finetune] step 5/6  loss 2.5  lr 1.00e-03  grad-norm 0.5" in err and "eta " in err

    # stderr: a pipe
    _drive(TrainingProgress(), training_args(disable_tqdm=False), steps=2, step_seconds=0, eval_seconds=0.01)
    err = capsys.readouterr().err
    assert "\r" not in err and "[finetune] step 2/2" in err

    _drive(
        TrainingProgress(bar=True),
        training_args(disable_tqdm=False),
        steps=2,
        step_seconds=0,
        eval_seconds=0.01,
        zero=False,
    )
    assert capsys.readouterr().err == ""
