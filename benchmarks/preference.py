"""LoRA DPO throughput, wall time and peak memory: `python -m finetune conf=dpo_demo` vs the plain trl DPOTrainer + peft
recipe, measured in the same run.

    python benchmarks/preference.py                             # 96 pairs, tiny GPT-Neo (4 layers x 128)
    python benchmarks/preference.py --rows 24                   # a quick check of the script itself (~2 min)
    python benchmarks/preference.py --shape wide                # 4 layers x 256 wide instead of tiny.py's 4 x 128
    python benchmarks/preference.py --shape wide --vocab family # ... with GPT-Neo's real 50,257-row head
    python benchmarks/preference.py --rows 96 --repeat 3        # median of 3 runs per side (sides alternate),
                                                                # for a busy machine

Both sides train the same local checkpoint (a random-weight GPT-Neo built once by `python -m finetune.tiny` into a
cache folder, benchmarks/train.py's build_models) on the same preference pairs, one epoch, batch 8, max length 384,
lr 5e-6, beta 0.1, fp32 on CPU:
- data: the first `--rows` pairs of the bundled `finetune/demo_data/legal_medical_prefs.jsonl` (Alpaca fields
  instruction/input + chosen/rejected) whose prompt + longer answer + EOS fits 384 tokens (longer ones are dropped up
  front, for both sides; the count is printed). The prompt text is rendered by our own code (the `alpaca` data
  template, finetune.data.tokenize.prompt_text), so both sides read the same text; the token ids of prompt+chosen
  and prompt+rejected are checked equal between the sides, for one row before training and for every row after
  (from the ids trl actually tokenized). A held-out file (the first max(8, 10%) fitting rows of the bundled
  `legal_medical_prefs_heldout.jsonl`) is read by our side only: our default evaluates, trl's recipe does not.
- trl (`--worker trl`, a subprocess that imports nothing of ours): the plain recipe. A `datasets` prompt / chosen /
  rejected string dataset (trl appends EOS itself), `DPOConfig(per_device_train_batch_size=8, max_length=384,
  num_train_epochs=1, logging_steps=10, save_strategy="no", report_to="none", use_cpu=True, bf16=False,
  learning_rate=5e-6, beta=0.1)`, `LoraConfig(r=8, lora_alpha=16, task_type="CAUSAL_LM")`,
  `DPOTrainer(model=PATH, args, train_dataset, processing_class=tokenizer, peft_config).train()`; trl's defaults
  for everything else (gradient checkpointing on, linear schedule without warmup, peft's default target modules:
  q_proj and v_proj on GPT-Neo, the reference = the base with the adapter switched off).
- ours: the real CLI, `python -m finetune conf=dpo_demo model.name_or_path=PATH model.tiny=null data.path=...
  data.eval_path=... data.max_length=384 trainer.per_device_train_batch_size=8 trainer.gradient_accumulation_steps=1
  trainer.num_train_epochs=1 trainer.save_strategy=no trainer.learning_rate=5e-6 trainer.logging_steps=10
  output_dir=...`. What still differs from trl's recipe is our default as shipped: LoRA r=16 / alpha 32 on every
  projection (model.lora_target_modules) without dropout, gradient checkpointing off, conf/trainer/demo.yaml's
  cosine schedule with 5% warmup (speed-neutral), and the work around training: evaluation of the held-out pairs
  before training, after it and at the end of the epoch (dpo_demo's eval_strategy=epoch), sample generations
  before / after, adapter + card + loss plot + report saved. Both sides are fp32 (dpo_demo: tiny_neo's
  model.dtype=float32, trainer/demo.yaml's bf16=false; trl: bf16=False, trl's float32 default load).

Counted per run: pairs trained, real (non-padding) tokens = per pair len(prompt+chosen) + len(prompt+rejected) (the
tokens the policy forwards each step; our run.json's data.train_tokens, the same count from trl's tokenized
dataset), train-loop seconds (the time inside `trainer.train()`: trl's measured by the worker; ours is run.json's
`train_seconds` less the end-of-epoch evaluation that runs inside it, whose `eval_runtime` metrics.json records),
tokens/s = real tokens / train-loop seconds, the subprocess's end-to-end wall time (ours includes everything listed
above), and its peak RSS (VmHWM of that process, read at exit: the trl worker reads its own, our CLI runs under
benchmarks/train.py's launcher, which reads it in an atexit hook). Target: ours >= 1.5x trl's tokens/s at <= 1.0x its
peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train as sft_bench  # noqa: E402  (benchmarks/train.py: checkpoints, launcher, peak RSS, medians)

PROJECT = sft_bench.PROJECT
PREFS = PROJECT / "finetune" / "demo_data" / "legal_medical_prefs.jsonl"
PREFS_HELDOUT = PROJECT / "finetune" / "demo_data" / "legal_medical_prefs_heldout.jsonl"
MAX_LENGTH, BATCH, LEARNING_RATE, BETA = 384, 8, 5e-6, 0.1
TARGET_SPEED, TARGET_RSS = 1.5, 1.0
SIDES = ("trl", "ours")


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


# ---------------------------------------------------------------- the trl side (a subprocess of this script)


def trl_worker(model: str, data: str, out: str) -> None:
    """The plain trl DPO recipe; prints one JSON line of what it trained and measured, writes the token ids it
    trained to OUT/tokenized.json (for the equality check)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(model)
    dataset = Dataset.from_list(_jsonl(Path(data)))  # prompt, chosen, rejected: strings
    args = DPOConfig(
        output_dir=out,
        per_device_train_batch_size=BATCH,
        max_length=MAX_LENGTH,
        num_train_epochs=1,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        learning_rate=LEARNING_RATE,
        beta=BETA,
    )
    peft_config = LoraConfig(r=8, lora_alpha=16, task_type="CAUSAL_LM")
    trainer = DPOTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config
    )
    trained = trainer.train_dataset  # tokenized: prompt_ids, chosen_ids, rejected_ids (EOS appended by trl)
    pairs = [[p + c, p + r] for p, c, r in zip(trained["prompt_ids"], trained["chosen_ids"], trained["rejected_ids"])]
    Path(out, "tokenized.json").write_text(json.dumps(pairs))
    tokens = sum(min(len(ids), MAX_LENGTH) for pair in pairs for ids in pair)  # the collator cuts at max_length
    started = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - started
    print(
        json.dumps(
            {
                "rows": len(trained),
                "tokens": tokens,
                "train_seconds": seconds,
                "steps": result.global_step,
                "train_loss": result.training_loss,
                "trainable": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
                "peak_rss": sft_bench.vmhwm(),
                "bf16": bool(args.bf16),
                "gradient_checkpointing": bool(args.gradient_checkpointing),
                "dtype": str(next(trainer.model.parameters()).dtype).removeprefix("torch."),
                "threads": torch.get_num_threads(),
            }
        )
    )


def run_trl(model_dir: Path, data: Path, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    log = out / "worker.log"
    command = [sys.executable, __file__, "--worker", "trl", "--model", str(model_dir), "--data", str(data)]
    started = time.perf_counter()
    with log.open("w") as stderr:
        result = subprocess.run(
            [*command, "--out", str(out)],
            cwd=PROJECT,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            check=False,
            env=sft_bench._env(),
        )
    wall = time.perf_counter() - started
    if result.returncode:
        return {"failed": sft_bench._last_error(log.read_text(errors="replace")), "log": str(log)}
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    return {**measured, "wall": wall, "ids": json.loads((out / "tokenized.json").read_text())}


# ---------------------------------------------------------------- our side: the real CLI


def run_ours(model_dir: Path, train: Path, heldout: Path, out: Path) -> dict:
    import yaml

    overrides = [
        "conf=dpo_demo",
        f"model.name_or_path={model_dir}",
        "model.tiny=null",
        f"data.path={train}",
        f"data.eval_path={heldout}",
        f"data.max_length={MAX_LENGTH}",
        f"trainer.per_device_train_batch_size={BATCH}",
        "trainer.gradient_accumulation_steps=1",
        "trainer.num_train_epochs=1",
        "trainer.save_strategy=no",
        f"trainer.learning_rate={LEARNING_RATE}",
        "trainer.max_steps=-1",
        "trainer.logging_steps=10",
        f"output_dir={out}",
        "overwrite=true",
    ]
    peak_file = out.parent / f"{out.name}.peak"
    log = out.parent / f"{out.name}.log"
    started = time.perf_counter()
    with log.open("w") as output:
        result = subprocess.run(
            [sys.executable, "-c", sft_bench.LAUNCHER, *overrides],
            cwd=PROJECT,
            stdout=output,
            stderr=subprocess.STDOUT,
            check=False,
            env={**sft_bench._env(), "BENCH_PEAK_FILE": str(peak_file)},
        )
    wall = time.perf_counter() - started
    if result.returncode:
        return {"failed": sft_bench._last_error(log.read_text(errors="replace")), "log": str(log)}
    record = json.loads((out / "run.json").read_text())
    history = json.loads((out / "metrics.json").read_text())["history"]
    end = next(i for i, h in enumerate(history) if "train_runtime" in h)
    in_loop_eval = sum(h["eval_runtime"] for h in history[:end] if "eval_runtime" in h)
    data = record["data"]
    config = yaml.safe_load((out / "config.yaml").read_text())  # resolved: what ran
    return {
        "rows": data["train_rows"],
        "tokens": data["train_tokens"],
        "train_seconds": record["train_seconds"] - in_loop_eval,
        "in_loop_eval": in_loop_eval,
        "steps": record["global_steps"],
        "train_loss": record["train_loss"],
        "trainable": record["trainable_parameters"],
        "peak_rss": int(peak_file.read_text()),
        "wall": wall,
        "bf16": bool(config["trainer"].get("bf16")),
        "gradient_checkpointing": bool(config["trainer"].get("gradient_checkpointing")),
        "dtype": config["model"]["dtype"],
        "dropped": data["rows_dropped"],
    }


# ---------------------------------------------------------------- data: the same pairs, the same text


def our_ids(tokenizer, template, row: dict) -> list[list[int]]:
    """Our token ids of prompt+chosen+EOS and prompt+rejected+EOS (finetune.data.preference tokenizes each
    conversation exactly as SFT does: prompt_ids + chosen_ids is the SFT sample of the chosen conversation)."""
    from finetune.data.tokenize import tokenize

    return [tokenize(tokenizer, template, _alpaca(row, row[answer])).input_ids for answer in ("chosen", "rejected")]


def _alpaca(row: dict, output: str) -> dict:
    return {"instruction": row.get("instruction") or "", "input": row.get("input") or "", "output": output}


def write_data(work: Path, n_rows: int, model_dir: Path) -> dict:
    """ours.jsonl (the first n_rows bundled pairs that fit MAX_LENGTH, as they are in the file), trl.jsonl (the same
    pairs as prompt / chosen / rejected strings, the prompt rendered by our alpaca template), heldout.jsonl (ours
    only), and our token ids of every training pair."""
    from transformers import AutoTokenizer

    from finetune.data import templates
    from finetune.data.tokenize import prompt_text

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    template = templates.load("alpaca")

    def fitting(pool: list[dict], wanted: int) -> tuple[list[dict], list[list[list[int]]], int]:
        kept, ids, too_long = [], [], 0
        for row in pool:
            pair = our_ids(tokenizer, template, row)
            if max(len(x) for x in pair) > MAX_LENGTH:  # prompt + the longer answer + EOS: our data.overlength=drop
                too_long += 1
                continue
            kept.append(row)
            ids.append(pair)
            if len(kept) == wanted:
                break
        return kept, ids, too_long

    train, ids, too_long = fitting(_jsonl(PREFS), n_rows)
    if len(train) < n_rows:
        sys.exit(f"{PREFS}: only {len(train)} pairs fit {MAX_LENGTH} tokens, {n_rows} wanted")
    heldout, _, _ = fitting(_jsonl(PREFS_HELDOUT), max(8, round(0.1 * n_rows)))
    trl_rows = [
        {
            "prompt": prompt_text(tokenizer, template, _alpaca(row, row["chosen"])),
            "chosen": row["chosen"],
            "rejected": row["rejected"],
        }
        for row in train
    ]
    check_first_row(tokenizer, trl_rows[0], ids[0])
    for name, rows in (("ours.jsonl", train), ("trl.jsonl", trl_rows), ("heldout.jsonl", heldout)):
        _write_jsonl(work / name, rows)
    return {
        "ours": work / "ours.jsonl",
        "trl": work / "trl.jsonl",
        "heldout": work / "heldout.jsonl",
        "heldout_rows": len(heldout),
        "skipped_too_long": too_long,
        "ids": ids,
    }


def check_first_row(tokenizer, trl_row: dict, ours: list[list[int]]) -> None:
    """Before training: trl tokenizes prompt + answer + EOS as one string; those ids must be ours."""
    for answer, expected in zip(("chosen", "rejected"), ours):
        text = trl_row["prompt"] + trl_row[answer] + tokenizer.eos_token
        if tokenizer(text)["input_ids"] != expected:
            sys.exit(
                f"row 1: trl's token ids of prompt + {answer} differ from ours; the sides would train different tokens"
            )


def check_trained_ids(trl: dict, ours: list[list[list[int]]]) -> str:
    """After the trl run: every pair trl tokenized vs ours."""
    theirs = trl.get("ids")
    if theirs is None:
        return "not checked (trl failed)"
    if len(theirs) != len(ours):
        return f"MISMATCH: trl trained {len(theirs)} pairs, ours {len(ours)}"
    differ = sum(1 for a, b in zip(theirs, ours) if a != b)
    return f"identical for all {len(ours)} pairs" if not differ else f"MISMATCH in {differ} of {len(ours)} pairs"


# ---------------------------------------------------------------- report


def table(results: dict[str, dict]) -> None:
    print("| side | rows | tokens | train s | tok/s | wall s | peak RSS MiB | ran |")
    print("|---|---|---|---|---|---|---|---|")
    for side, m in results.items():
        if "failed" in m:
            print(f"| {side} | failed: {m['failed']} (log: {m['log']}) | | | | | | |")
            continue
        ran = (
            f"{m['dtype']}, {'bf16 autocast' if m['bf16'] else 'no autocast'}, checkpointing "
            f"{'on' if m['gradient_checkpointing'] else 'off'}, {m['steps']} steps, {m['trainable']:,} LoRA params"
        )
        print(
            f"| {side} | {m['rows']} | {m['tokens']:,} | {m['train_seconds']:.1f} | "
            f"{m['tokens'] / m['train_seconds']:,.0f}{sft_bench._spread(m)} | {m['wall']:.1f} | "
            f"{m['peak_rss'] / 2**20:,.0f} | {ran} |"
        )


def ratios(results: dict[str, dict]) -> None:
    trl, ours = results["trl"], results["ours"]
    if "failed" in trl or "failed" in ours:
        print("\nratios: not computed (a side failed)")
        return
    speed = (ours["tokens"] / ours["train_seconds"]) / (trl["tokens"] / trl["train_seconds"])
    wall = ours["wall"] / trl["wall"]
    rss = ours["peak_rss"] / trl["peak_rss"]
    print(f"\nours/trl: tokens/s {speed:.2f}x, wall time {wall:.2f}x, peak RSS {rss:.2f}x")
    verdict = "PASS" if speed >= TARGET_SPEED and rss <= TARGET_RSS else "MISS"
    print(
        f"target: >= {TARGET_SPEED}x tokens/s at <= {TARGET_RSS}x peak RSS: {verdict} "
        f"(tokens/s {speed:.2f}x {'ok' if speed >= TARGET_SPEED else 'short'}, "
        f"RSS {rss:.2f}x {'ok' if rss <= TARGET_RSS else 'over'})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=96, help="training pairs (the first that fit max length 384)")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs of each side; the median is reported (a busy machine is noisy)",
    )
    parser.add_argument(
        "--shape",
        choices=sft_bench.SHAPES,
        default="tiny",
        help="tiny: 4 layers x 128 (finetune.tiny's default); wide: 4 x 256",
    )
    parser.add_argument(
        "--vocab",
        choices=["tokenizer", "family"],
        default="tokenizer",
        help="rows of the embedding / LM head: the tiny tokenizer's, or GPT-Neo's real 50,257",
    )
    parser.add_argument(
        "--cache",
        default=None,
        help="where the checkpoint is built once (default: $NEO_FINETUNE_CACHE/bench or ~/.cache/neo-finetune/bench)",
    )
    parser.add_argument(
        "--workdir", default=None, help="keep data and run folders here (default: a temporary folder, removed)"
    )
    parser.add_argument("--worker", choices=["trl"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        trl_worker(args.model, args.data, args.out)
        return
    cache = Path(
        args.cache or Path(os.environ.get("NEO_FINETUNE_CACHE", Path.home() / ".cache" / "neo-finetune")) / "bench"
    )
    work = Path(args.workdir or tempfile.mkdtemp(prefix="preference-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    try:
        model_dir = sft_bench.build_models(["neo"], args.shape, args.vocab, cache)["neo"]
        data = write_data(work, args.rows, model_dir)
        hidden, layers = sft_bench.SHAPES[args.shape]
        head = f"{sft_bench.FAMILY_VOCAB['neo']:,}" if args.vocab == "family" else "the tokenizer's"
        print(
            f"data: {args.rows} pairs + {data['heldout_rows']} held out (ours only) from {PREFS.name}, "
            f"{data['skipped_too_long']} longer than {MAX_LENGTH} tokens skipped; model: random GPT-Neo {layers} x "
            f"{hidden}, head of {head} rows, in {model_dir}",
            file=sys.stderr,
            flush=True,
        )
        runs: dict[str, list[dict]] = {side: [] for side in SIDES}
        for repeat in range(args.repeat):  # the sides alternate, so a busy spell of the machine hits both
            for side in SIDES:
                out = work / (side + (f"-{repeat + 1}" if args.repeat > 1 else ""))
                t = time.perf_counter()
                if side == "trl":
                    measured = run_trl(model_dir, data["trl"], out)
                else:
                    measured = run_ours(model_dir, data["ours"], data["heldout"], out)
                runs[side].append(measured)
                state = measured.get("failed") or f"{measured['tokens'] / measured['train_seconds']:,.0f} tokens/s"
                print(f"{side} #{repeat + 1}: {state} ({time.perf_counter() - t:.0f} s)", file=sys.stderr, flush=True)
        results = {side: sft_bench.median_run(side_runs) for side, side_runs in runs.items()}
        ids_check = check_trained_ids(runs["trl"][0], data["ids"])
        print()
        print(
            f"LoRA DPO on CPU ({os.cpu_count()} cores), random GPT-Neo {layers}x{hidden}"
            + (f" vocab {sft_bench.FAMILY_VOCAB['neo']:,}" if args.vocab == "family" else "")
            + f", {args.rows} pairs of {PREFS.name}, 1 epoch, batch {BATCH}, max length {MAX_LENGTH}, "
            f"lr {LEARNING_RATE}, beta {BETA}; ours = {sft_bench.source_state()}"
        )
        print()
        table(results)
        ratios(results)
        print(f"\ntoken ids of prompt+chosen / prompt+rejected, trl vs ours: {ids_check}")
        ours = results["ours"]
        if "failed" not in ours:
            print(
                f"ours' end-of-epoch evaluation inside trainer.train(), left out of its train-loop seconds: "
                f"{ours['in_loop_eval']:.1f} s; rows ours dropped: {ours['dropped'] or 'none'}"
            )
        for m in [*results.values(), *(m for side_runs in runs.values() for m in side_runs)]:
            m.pop("ids", None)  # the equality check has read them
        (work / "results.json").write_text(json.dumps({"results": results, "runs": runs}, indent=2, default=str))
        print(
            f"\ntotal {time.perf_counter() - began:.0f} s"
            + (f"; runs and results.json in {work}" if args.workdir else "")
        )
        if ids_check.startswith("MISMATCH"):
            sys.exit("the two sides trained different token ids: the comparison is not valid")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.path.insert(0, str(PROJECT))
    main()
