"""LoRA SFT throughput, wall time and peak memory: `python -m finetune` vs the plain TRL recipe, measured in the same
run.

    python benchmarks/train.py                                  # neo and neox, fp32 and best, 400 rows
    python benchmarks/train.py --models neo --precision best --rows 48     # a quick check of the script itself
    python benchmarks/train.py --shape wide                     # 4 layers x 256 wide instead of tiny.py's 4 x 128
    python benchmarks/train.py --shape wide --vocab family      # ... with the family's real 50k-row head
                                                                # (most of a small model's step)
    python benchmarks/train.py --rows 96 --repeat 3             # median of 3 runs per side (sides alternate),
                                                                # for a busy machine
    # issue 26's setup: GPT-Neo 4 x 256, window 128, an 8k BPE trained on the data, our default precision
    python benchmarks/train.py --models neo --precision best --shape wide --vocab data8k --window 128 --ours ours \
        --repeat 3
    # GPT-Neo-125M's shape (12 x 768, 12 heads, window 256) with the real 50,257-row head
    python benchmarks/train.py --models neo --precision best --shape neo125m --vocab family --window 256 --ours ours \
        --rows 64

Our side's wall time is also broken down by phase (run.json's phase_seconds: startup, data, model and trainer,
evaluation and sample generation before, training steps, the end-of-epoch evaluation, after, and what is left:
saving and exiting), against trl's fixed part (its wall time less trainer.train()).

Both sides train the same local checkpoints (random-weight GPT-Neo / GPT-NeoX built once by `python -m finetune.tiny`
into a cache folder) on the same rows of instruction data, one epoch, global batch 8, max length 512, on CPU:
- data: `--rows` rows of real medical Q&A (`../shared/datasets/chatdoctor5k.json`, Alpaca fields, a seeded sample,
  so the length mix is the file's) when that file exists, else the bundled `legal_medical_qa.jsonl`. Rows longer
  than 512 tokens in any benchmarked tokenizer are left out first (our default drops them, trl would truncate
  them). 10% more rows go to a held-out file that only our side reads (our default evaluates; trl's recipe does not).
- trl (`--worker trl`, a subprocess): the plain recipe. A `datasets` prompt/completion dataset (the Alpaca prompt
  text, completion = output + EOS), `SFTConfig(per_device_train_batch_size=8, max_length=512, num_train_epochs=1,
  logging_steps=10, save_strategy="no", report_to="none", use_cpu=True, bf16=...)`, `LoraConfig(r=8, lora_alpha=16,
  task_type="CAUSAL_LM")`, `SFTTrainer(model=PATH, args, train_dataset, peft_config).train()`; trl's defaults for
  everything else (gradient checkpointing on, lr 2e-5, peft's default target modules).
- ours: the real CLI, `python -m finetune model=tiny_neo|tiny_neox model.name_or_path=PATH data=alpaca data.path=...
  data.eval_path=... data.max_length=512 trainer.per_device_train_batch_size=8 trainer.gradient_accumulation_steps=1
  trainer.num_train_epochs=1 trainer.save_strategy=no`, our defaults for everything else (LoRA r=16 on every
  projection without dropout, data.packing=auto, eval before / after / each epoch, one sample generation, adapter +
  card + loss plot saved).
Precision: `fp32` is fp32 weights and no autocast on both sides (ours: model.dtype=float32 trainer.bf16=false);
`best` is each side's default: trl's bf16=True (if it fails on CPU, its error is shown and fp32 is used), ours
the family presets' model.dtype=auto trainer.bf16=auto (bf16 weights and autocast where the CPU computes bf16
natively, else fp32), not the tiny demo preset's pinned fp32. The table shows what each run really used: the trl
worker reports its args and weight dtype, ours is read from the resolved config.yaml of its run directory.

Counted per run: rows and real (non-padding) tokens trained, supervised tokens (labels != -100), train-loop
seconds (the time inside `trainer.train()`: trl's measured by the worker; ours is run.json's `train_seconds`
less the end-of-epoch evaluation that runs inside it, whose `eval_runtime` metrics.json records), tokens/s =
real tokens / train-loop seconds, the subprocess's end-to-end wall time, and its peak RSS (VmHWM of that process,
read at exit: the trl worker reads its own; for our CLI, `python -m finetune` itself, os.wait4's ru_maxrss).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
CHATDOCTOR = PROJECT.parent / "shared" / "datasets" / "chatdoctor5k.json"
DEMO = PROJECT / "finetune" / "demo_data" / "legal_medical_qa.jsonl"
# (hidden size, layers, heads); tiny = finetune.tiny's default; neo125m = GPT-Neo-125M's body (12 x 768, 12 heads)
SHAPES = {"tiny": (128, 4, 4), "wide": (256, 4, 4), "neo125m": (768, 12, 12)}
# Rows of the embedding / LM head in the real checkpoints (GPT-Neo's 50,257 tokens; Pythia and NeoX-20B pad to a
# multiple of 128: 50,304 for Pythia). --vocab family gives the tiny body that head; the tokenizer stays the tiny one.
FAMILY_VOCAB = {"neo": 50_257, "neox": 50_304}
DATA_VOCAB = 8192  # --vocab data8k: issue 26's tokenizer, trained on the data
MAX_LENGTH, BATCH = 512, 8
# The Alpaca prompt, word for word as data_templates/alpaca.yaml renders it (checked against it in main()).
PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


def vmhwm() -> int:
    """This process's peak resident memory (finetune.merge.peak_rss_bytes, inlined: the trl side imports nothing of
    ours)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status (Linux only)")


def prompt(row: dict) -> str:
    return (PROMPT_INPUT if row.get("input") else PROMPT_NO_INPUT).format(**row)


# ---------------------------------------------------------------- the trl side (a subprocess of this script)


def trl_worker(model: str, data: str, out: str, bf16: bool) -> None:
    """The plain TRL recipe; prints one JSON line of what it trained and measured."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    eos = AutoTokenizer.from_pretrained(model).eos_token
    rows = [json.loads(line) for line in Path(data).read_text(encoding="utf-8").splitlines() if line.strip()]
    dataset = Dataset.from_list([{"prompt": prompt(r), "completion": r["output"] + eos} for r in rows])
    args = SFTConfig(
        output_dir=out,
        per_device_train_batch_size=BATCH,
        max_length=MAX_LENGTH,
        num_train_epochs=1,
        report_to="none",
        logging_steps=10,
        save_strategy="no",
        bf16=bf16,
        use_cpu=True,
    )
    peft_config = LoraConfig(r=8, lora_alpha=16, task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, peft_config=peft_config)
    trained = trainer.train_dataset  # tokenized, labels built, truncated to max_length (no padding yet)
    tokens = sum(len(ids) for ids in trained["input_ids"])
    supervised = sum(sum(1 for t in labels if t != -100) for labels in trained["labels"])
    started = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - started
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    print(
        json.dumps(
            {
                "rows": len(trained),
                "tokens": tokens,
                "supervised": supervised,
                "train_seconds": seconds,
                "train_runtime": result.metrics["train_runtime"],
                "steps": result.global_step,
                "train_loss": result.training_loss,
                "trainable": trainable,
                "peak_rss": vmhwm(),
                "bf16": bool(args.bf16),
                "gradient_checkpointing": bool(args.gradient_checkpointing),
                "dtype": str(next(trainer.model.parameters()).dtype).removeprefix("torch."),
                "threads": torch.get_num_threads(),
            }
        )
    )


def run_trl(model_dir: Path, data: Path, out: Path, bf16: bool) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    log = out / "worker.log"
    started = time.perf_counter()
    with log.open("w") as stderr:
        result = subprocess.run(
            [
                sys.executable,
                __file__,
                "--worker",
                "trl",
                "--model",
                str(model_dir),
                "--data",
                str(data),
                "--out",
                str(out),
                "--bf16",
                str(int(bf16)),
            ],
            cwd=PROJECT,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            check=False,
            env=_env(),
        )
    wall = time.perf_counter() - started
    if result.returncode:
        return {"failed": _last_error(log.read_text(errors="replace")), "log": str(log)}
    return {**json.loads(result.stdout.strip().splitlines()[-1]), "wall": wall}


# ---------------------------------------------------------------- our side: the real CLI

# Our side as shipped (data.packing=auto, LoRA r=16 on every projection, no dropout), without packing (what auto chose
# is worth), with TRL's adapter (peft's default targets, r=8: the engine's speed apart from the adapter's size), and
# with gradient checkpointing (trl's default: the same memory policy on both sides).
TRL_ADAPTER = {"neo": "[q_proj,v_proj]", "neox": "[query_key_value]"}
OUR_VARIANTS = {
    "ours": lambda arch: [],
    "ours-no-packing": lambda arch: ["data.packing=false"],
    "ours+trl-adapter": lambda arch: [
        "strategy.r=8",
        "strategy.lora_alpha=16",
        f"strategy.target_modules={TRL_ADAPTER[arch]}",
    ],
    "ours+checkpointing": lambda arch: ["trainer.gradient_checkpointing=true"],  # trl's recipe checkpoints by default
}


def run_ours(
    arch: str, model_dir: Path, train: Path, heldout: Path, out: Path, best: bool, extra: list[str] = ()
) -> dict:
    overrides = [
        f"model=tiny_{arch}",
        f"model.name_or_path={model_dir}",
        "model.tiny=null",
        "data=alpaca",
        f"data.path={train}",
        f"data.eval_path={heldout}",
        f"data.max_length={MAX_LENGTH}",
        f"trainer.per_device_train_batch_size={BATCH}",
        "trainer.gradient_accumulation_steps=1",
        "trainer.num_train_epochs=1",
        "trainer.save_strategy=no",
        f"output_dir={out}",
        "overwrite=true",
    ]
    # best: the precision our family presets train in (auto: bf16 where the CPU has it natively), not the tiny demo
    # preset's fp32 (which conf/model/tiny_*.yaml and conf/trainer/demo.yaml pin for bit-reproducible demo runs)
    overrides += ["model.dtype=auto", "trainer.bf16=auto"] if best else ["model.dtype=float32", "trainer.bf16=false"]
    overrides += list(extra)
    import yaml

    log = out.parent / f"{out.name}.log"
    started = time.perf_counter()
    with log.open("w") as output:
        child = subprocess.Popen(
            [sys.executable, "-m", "finetune", *overrides],
            cwd=PROJECT,
            stdout=output,
            stderr=subprocess.STDOUT,
            env=_env(),
        )
        _, status, usage = os.wait4(child.pid, 0)  # the child's own peak RSS (ru_maxrss, KiB), as VmHWM reads it
    returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    if returncode:
        return {"failed": _last_error(log.read_text(errors="replace")), "log": str(log)}
    record = json.loads((out / "run.json").read_text())
    history = json.loads((out / "metrics.json").read_text())["history"]
    end = next(i for i, h in enumerate(history) if "train_runtime" in h)
    in_loop_eval = sum(h["eval_runtime"] for h in history[:end] if "eval_runtime" in h)
    data = record["data"]
    config = yaml.safe_load((out / "config.yaml").read_text())  # resolved: what ran, `auto` replaced by the choice
    return {
        "rows": data["train_rows"],
        "tokens": data["train_tokens"],
        "supervised": data["train_trained_tokens"],
        "train_seconds": record["train_seconds"] - in_loop_eval,
        "in_loop_eval": in_loop_eval,
        "train_runtime": history[end]["train_runtime"],
        "steps": record["global_steps"],
        "train_loss": record["train_loss"],
        "trainable": record["trainable_parameters"],
        "peak_rss": usage.ru_maxrss * 1024,
        "wall": wall,
        "bf16": bool(config["trainer"].get("bf16")),
        "dtype": config["model"]["dtype"],
        "precision_record": record.get("precision"),
        "attention": config["model"].get("attn_implementation"),
        "dropped": data["rows_dropped"],
        "phases": fixed_seconds(record, json.loads((out / "metrics.json").read_text()), in_loop_eval, wall),
    }


def fixed_seconds(record: dict, metrics: dict, in_loop_eval: float, wall: float) -> dict:
    """Where our run's wall time went, from run.json's phase_seconds (finetune/runs/phases.py) and metrics.json's
    evaluation runtimes: the phases before and after the steps are the fixed cost a small run waits for."""
    phases = dict(record.get("phase_seconds") or {})
    if not phases:
        return {}
    eval_before = (metrics.get("eval_before") or {}).get("eval_runtime", 0.0)
    table = {
        "startup: python, imports, config, validation": phases.get("startup", 0.0),
        "data: tokenizer, read, tokenize, pack, fingerprint": phases.get("data", 0.0),
        "training arguments, model load, trainer construction": sum(
            phases.get(k, 0.0) for k in ("arguments", "model", "trainer")
        ),
        "eval before training (held-out loss of the base)": eval_before,
        "sample generation before training": phases.get("before", 0.0) - eval_before,
        "training steps (trainer.train less its evaluation)": phases.get("train", 0.0) - in_loop_eval,
        "end-of-epoch evaluation (reused as the after numbers)": in_loop_eval,
        "sample generation after training (+ eval if not reused)": phases.get("after", 0.0),
    }
    table["save: adapter, metrics, plot, card, manifest, report; exit"] = wall - sum(phases.values())
    return {name: round(max(0.0, seconds), 2) for name, seconds in table.items()}


def source_state() -> str:
    """The commit our side ran, and whether the working tree differed from it (results are only comparable per
    state)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=PROJECT, capture_output=True, text=True, check=True
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=PROJECT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return "not a git checkout"
    return f"commit {head}" + (f" + uncommitted changes in {len(changed)} tracked files" if changed else "")


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(PROJECT), "TOKENIZERS_PARALLELISM": "false"}


def _last_error(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or line.startswith("error:")]
    return (errors or lines or ["(no output)"])[-1].strip()[:400]


# ---------------------------------------------------------------- fixtures: checkpoints and data


def corpus_file(cache: Path) -> Path:
    """The data file as JSONL (what tiny.py trains a tokenizer on): every ChatDoctor row, else the bundled rows."""
    if not CHATDOCTOR.is_file():
        return DEMO
    out = cache / "chatdoctor5k.jsonl"
    if not out.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        rows = json.loads(CHATDOCTOR.read_text(encoding="utf-8"))
        out.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return out


def build_models(archs: list[str], shape: str, vocab: str, cache: Path, window: int = 32) -> dict[str, Path]:
    """Random checkpoints built once into `cache`. vocab: `tokenizer` = tiny.py's 1,024-token BPE on its own corpus;
    `family` = that tokenizer under the family's real 50k-row head; `data8k` = an 8,192-token BPE trained on the
    benchmark's data file (all of ChatDoctor, or the bundled rows), the issue-26 setup."""
    hidden, layers, heads = SHAPES[shape]
    folders = {}
    for arch in archs:
        rows = FAMILY_VOCAB[arch] if vocab == "family" else None
        tokens = DATA_VOCAB if vocab == "data8k" else 1024
        corpus = corpus_file(cache) if vocab == "data8k" else None
        folder = cache / (
            f"tiny-{arch}-{hidden}x{layers}"
            + (f"-v{rows}" if rows else "")
            + (f"-bpe{tokens}-{corpus.stem}" if corpus else "")
            + (f"-w{window}" if window != 32 else "")
            + (f"-h{heads}" if heads != 4 else "")
        )
        marker = folder / "tiny_build.json"
        built = json.loads(marker.read_text()) if marker.is_file() else {}
        if (
            built.get("hidden_size") != hidden
            or built.get("layers") != layers
            or built.get("model_vocab_size") != rows
            or built.get("vocab_size") != tokens
            or built.get("window_size", 32) != window
            or built.get("heads", 4) != heads
        ):
            print(
                f"building {folder} (random weights, {layers} layers x {hidden}, window {window}, head of "
                f"{rows or 'the tokenizer'} rows, a {tokens}-token BPE)",
                file=sys.stderr,
                flush=True,
            )
            padded = ["--model-vocab-size", str(rows)] if rows else []
            trained_on = ["--corpus", str(corpus)] if corpus else []
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "finetune.tiny",
                    "--arch",
                    arch,
                    "--out",
                    str(folder),
                    "--hidden-size",
                    str(hidden),
                    "--layers",
                    str(layers),
                    "--vocab-size",
                    str(tokens),
                    "--window-size",
                    str(window),
                    "--heads",
                    str(heads),
                    *padded,
                    *trained_on,
                ],
                cwd=PROJECT,
                check=True,
                capture_output=True,
                env=_env(),
            )
        folders[arch] = folder
    return folders


def write_data(work: Path, n_rows: int, tokenizers: list[Path], seed: int = 0) -> dict:
    """train.jsonl (n_rows) and heldout.jsonl (10% more), a seeded sample of rows that fit MAX_LENGTH in every
    tokenizer."""
    from tokenizers import Tokenizer

    if CHATDOCTOR.is_file():
        source, pool = CHATDOCTOR, json.loads(CHATDOCTOR.read_text(encoding="utf-8"))
    else:
        source = DEMO
        pool = [json.loads(line) for line in DEMO.read_text(encoding="utf-8").splitlines() if line.strip()]
    pool = [{k: r.get(k) or "" for k in ("instruction", "input", "output")} for r in pool]
    random.Random(seed).shuffle(pool)
    encoders = [Tokenizer.from_file(str(t / "tokenizer.json")) for t in tokenizers]
    wanted, kept, too_long = n_rows + max(1, round(0.1 * n_rows)), [], 0
    for row in pool:
        text = prompt(row) + row["output"]
        if max(len(tok.encode(text, add_special_tokens=False).ids) + 1 for tok in encoders) > MAX_LENGTH:
            too_long += 1
            continue
        kept.append(row)
        if len(kept) == wanted:
            break
    if len(kept) < wanted:
        sys.exit(f"{source}: only {len(kept)} rows fit {MAX_LENGTH} tokens, {wanted} wanted")
    for name, rows in (("train.jsonl", kept[:n_rows]), ("heldout.jsonl", kept[n_rows:])):
        (work / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return {
        "source": source,
        "train": work / "train.jsonl",
        "heldout": work / "heldout.jsonl",
        "skipped_too_long": too_long,
        "heldout_rows": wanted - n_rows,
    }


def check_prompt(model_dir: Path, train: Path) -> None:
    """The trl side's prompt text must be what our alpaca template renders (else the two sides train different text)."""
    from transformers import AutoTokenizer

    from finetune.data import templates
    from finetune.data.tokenize import prompt_text

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    template = templates.load("alpaca")
    for line in train.read_text(encoding="utf-8").splitlines()[:3]:
        row = json.loads(line)
        if prompt_text(tokenizer, template, row) != prompt(row):
            sys.exit(
                "the trl side's Alpaca prompt differs from data_templates/alpaca.yaml; fix PROMPT_INPUT / "
                "PROMPT_NO_INPUT"
            )


def run_side(side: str, precision: str, arch: str, model_dir: Path, data: dict, out: Path) -> tuple[dict, str]:
    """One training run of one side: (what it measured, how its precision was chosen)."""
    if side in OUR_VARIANTS:
        measured = run_ours(
            arch,
            model_dir,
            data["train"],
            data["heldout"],
            out,
            best=precision == "best",
            extra=OUR_VARIANTS[side](arch),
        )
        return measured, "our default" if precision == "best" else "fp32"
    measured = run_trl(model_dir, data["train"], out, bf16=precision == "best")
    if precision == "best" and "failed" in measured:
        print(f"trl bf16 failed on CPU: {measured['failed']}; best = fp32", file=sys.stderr)
        fallback = run_trl(model_dir, data["train"], out.with_name(out.name + "-fp32"), bf16=False)
        return {**fallback, "bf16_error": measured["failed"]}, "trl default failed: fp32"
    return measured, "trl default" if precision == "best" else "fp32"


def median_run(runs: list[dict]) -> dict:
    """One run's record with the median train-loop seconds, wall time and peak RSS of the repeats (`--repeat`)."""
    good = [r for r in runs if "failed" not in r]
    if len(good) < len(runs):
        return next(r for r in runs if "failed" in r)
    merged = dict(good[0])
    for key in ("train_seconds", "wall", "peak_rss", "in_loop_eval"):
        if key in merged:
            merged[key] = statistics.median(r[key] for r in good)
    merged["speeds"] = [r["tokens"] / r["train_seconds"] for r in good]
    if good[0].get("phases"):  # one run's own breakdown (it adds up to its wall time): the median-wall run's
        merged["phases"] = sorted(good, key=lambda r: r["wall"])[len(good) // 2]["phases"]
    return merged


# ---------------------------------------------------------------- report


def table(results: list[dict]) -> None:
    print(
        "| model | side | precision | rows | real tokens | supervised tokens | train-loop s | tokens/s | supervised "
        "tokens/s | wall s | peak RSS |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        m = r["measured"]
        if "failed" in m:
            print(f"| {r['model']} | {r['side']} | {r['precision']} | failed: {m['failed']} | | | | | | | |")
            continue
        ran = f"{m['dtype']} weights, {'bf16 autocast' if m['bf16'] else 'no autocast'}"
        print(
            f"| {r['model']} | {r['side']} | {r['precision_label']}: {ran} | {m['rows']} | {m['tokens']:,} | "
            f"{m['supervised']:,} | "
            f"{m['train_seconds']:.1f} | {m['tokens'] / m['train_seconds']:,.0f}{_spread(m)} | "
            f"{m['supervised'] / m['train_seconds']:,.0f} | "
            f"{m['wall']:.1f} | {m['peak_rss'] / 2**20:,.0f} MiB |"
        )


def _spread(m: dict) -> str:
    speeds = m.get("speeds", [])
    return f" ({min(speeds):,.0f}-{max(speeds):,.0f})" if len(speeds) > 1 else ""


def ratios(results: list[dict]) -> None:
    targets = {"best": 2.5, "fp32": 1.5}  # issue 26: >= 2.5x in tokens/s and in whole-process wall time
    print(
        "\n| model | precision | our side | ours/trl tokens/s | whole process: trl wall / ours | target | "
        "ours/trl peak RSS (target <= 1) |"
    )
    print("|---|---|---|---|---|---|---|")
    for model in dict.fromkeys(r["model"] for r in results):
        for precision in dict.fromkeys(r["precision"] for r in results):
            pair = {r["side"]: r["measured"] for r in results if r["model"] == model and r["precision"] == precision}
            trl = pair.get("trl")
            if trl is None or "failed" in trl:
                continue
            for side, ours in pair.items():
                if side == "trl" or "failed" in ours:
                    continue
                speed = (ours["tokens"] / ours["train_seconds"]) / (trl["tokens"] / trl["train_seconds"])
                whole = trl["wall"] / ours["wall"]
                rss = ours["peak_rss"] / trl["peak_rss"]
                target = targets[precision]
                verdict = "pass" if min(speed, whole) >= target else "miss"
                print(
                    f"| {model} | {precision} | {side} | **{speed:.2f}x** | **{whole:.2f}x** | >= {target}x both "
                    f"({verdict}) | {rss:.2f}x ({'pass' if rss <= 1 else 'miss'}) |"
                )


def fixed_table(results: list[dict]) -> None:
    """Our side's wall time by phase (the breakdown of its median-wall run), beside trl's whole process."""
    for r in results:
        phases = r["measured"].get("phases")
        if r["side"] not in OUR_VARIANTS or not phases:
            continue
        trl = next(
            (
                t["measured"]
                for t in results
                if t["side"] == "trl" and t["model"] == r["model"] and t["precision"] == r["precision"]
            ),
            {},
        )
        print(f"\nwhere the wall time of {r['side']} went ({r['model']}, {r['precision']}; run.json phase_seconds):")
        print("\n| phase | seconds |\n|---|---|")
        for name, seconds in phases.items():
            print(f"| {name} | {seconds:.2f} |")
        steps = "training steps (trainer.train less its evaluation)"
        fixed = sum(v for k, v in phases.items() if k != steps)
        print(f"| **fixed (all but the steps)** | **{fixed:.1f}** |")
        if "wall" in trl and "train_seconds" in trl:
            print(
                f"| trl's whole process / its fixed part (wall less trainer.train) | {trl['wall']:.1f} / "
                f"{trl['wall'] - trl['train_seconds']:.1f} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="neo,neox", help="comma-separated: neo, neox")
    parser.add_argument("--precision", default="fp32,best", help="comma-separated: fp32, best")
    parser.add_argument(
        "--rows", type=int, default=400, help="training rows (10%% more are written as the held-out file)"
    )
    parser.add_argument(
        "--ours",
        default=",".join(OUR_VARIANTS),
        help=f"comma-separated variants of our side: {', '.join(OUR_VARIANTS)}",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs of each (model, precision, side); the median is reported (a busy machine is noisy)",
    )
    parser.add_argument(
        "--shape",
        choices=SHAPES,
        default="tiny",
        help="tiny: 4 layers x 128 (finetune.tiny's default); wide: 4 x 256; neo125m: GPT-Neo-125M's 12 x 768 "
        "(12 heads)",
    )
    parser.add_argument(
        "--vocab",
        choices=["tokenizer", "family", "data8k"],
        default="tokenizer",
        help="rows of the embedding / LM head: the tiny tokenizer's 1,024, the family's real 50,257 (neo) / 50,304 "
        "(neox), or data8k: an 8,192-token BPE trained on the data (issue 26's setup)",
    )
    parser.add_argument("--window", type=int, default=32, help="GPT-Neo's local attention window (issue 26: 128)")
    parser.add_argument(
        "--cache",
        default=None,
        help="where the checkpoints are built once (default: $NEO_FINETUNE_CACHE/bench or ~/.cache/neo-finetune/bench)",
    )
    parser.add_argument(
        "--workdir", default=None, help="keep data and run folders here (default: a temporary folder, removed)"
    )
    parser.add_argument("--worker", choices=["trl"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--bf16", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        trl_worker(args.model, args.data, args.out, bool(args.bf16))
        return
    archs = [a for a in args.models.split(",") if a]
    precisions = [p for p in args.precision.split(",") if p]
    if set(archs) - {"neo", "neox"} or set(precisions) - {"fp32", "best"}:
        parser.error("--models takes neo,neox and --precision takes fp32,best")
    cache = Path(
        args.cache or Path(os.environ.get("NEO_FINETUNE_CACHE", Path.home() / ".cache" / "neo-finetune")) / "bench"
    )
    work = Path(args.workdir or tempfile.mkdtemp(prefix="train-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    try:
        ours_variants = args.ours.split(",")
        unknown = [v for v in ours_variants if v not in OUR_VARIANTS]
        if unknown:
            parser.error(f"--ours: unknown variant(s) {', '.join(unknown)}; choose from {', '.join(OUR_VARIANTS)}")
        models = build_models(archs, args.shape, args.vocab, cache, args.window)
        data = write_data(work, args.rows, list(models.values()))
        check_prompt(models[archs[0]], data["train"])
        hidden, layers, _ = SHAPES[args.shape]
        head = "/".join(f"{FAMILY_VOCAB[a]:,}" for a in archs) if args.vocab == "family" else "the tokenizer's"
        print(
            f"data: {args.rows} train rows + {data['heldout_rows']} held out (ours only) from {data['source'].name}, "
            "seeded sample, "
            f"{data['skipped_too_long']} longer than {MAX_LENGTH} tokens skipped; models: random {layers} x {hidden} "
            f"{', '.join(archs)}, window {args.window}, head of {head} rows, in {cache}",
            file=sys.stderr,
            flush=True,
        )
        results = []
        for arch in archs:
            for precision in precisions:
                runs, labels = {"trl": [], **{variant: [] for variant in ours_variants}}, {}
                for repeat in range(args.repeat):  # the sides alternate, so a busy spell of the machine hits both
                    for side, side_runs in runs.items():
                        slug = re.sub(r"[^a-z0-9]+", "-", side)
                        out = work / (f"{arch}-{precision}-{slug}" + (f"-{repeat + 1}" if args.repeat > 1 else ""))
                        t = time.perf_counter()
                        measured, labels[side] = run_side(side, precision, arch, models[arch], data, out)
                        side_runs.append(measured)
                        state = (
                            measured.get("failed") or f"{measured['tokens'] / measured['train_seconds']:,.0f} tokens/s"
                        )
                        print(
                            f"{arch} {precision} {side} #{repeat + 1}: {state} ({time.perf_counter() - t:.0f} s)",
                            file=sys.stderr,
                            flush=True,
                        )
                for side, side_runs in runs.items():
                    results.append(
                        {
                            "model": f"{arch} {layers}x{hidden}"
                            + (f" vocab {FAMILY_VOCAB[arch]:,}" if args.vocab == "family" else "")
                            + (f" bpe {DATA_VOCAB:,}" if args.vocab == "data8k" else "")
                            + (f" w{args.window}" if args.window != 32 else ""),
                            "side": side,
                            "precision": precision,
                            "precision_label": labels[side],
                            "measured": median_run(side_runs),
                            "runs": side_runs,
                        }
                    )
        print()
        print(
            f"LoRA SFT on CPU ({os.cpu_count()} cores), {args.rows} rows of {data['source'].name}, 1 epoch, batch 8, "
            f"max length {MAX_LENGTH}; ours = {source_state()}"
        )
        print()
        table(results)
        ratios(results)
        fixed_table(results)
        notes = {(r["model"], r["side"]): r["measured"] for r in results if "failed" not in r["measured"]}
        print("\ntrainable LoRA parameters: " + ", ".join(f"{m} {s} {v['trainable']:,}" for (m, s), v in notes.items()))
        ours_eval = [
            r["measured"]["in_loop_eval"]
            for r in results
            if r["side"] in OUR_VARIANTS and "failed" not in r["measured"]
        ]
        if ours_eval:
            print(
                f"ours' end-of-epoch evaluation inside trainer.train(), left out of its train-loop seconds: "
                f"{statistics.mean(ours_eval):.1f} s on average"
            )
        for record in dict.fromkeys(
            r["measured"].get("precision_record") for r in results if r["side"] in OUR_VARIANTS
        ):
            if record:
                print(f"ours, precision as run.json records it: {record}")
        for r in results:
            if "bf16_error" in r["measured"]:
                print(f"{r['model']} trl bf16 error: {r['measured']['bf16_error']}")
            if "failed" in r["measured"]:
                print(
                    f"{r['model']} {r['side']} {r['precision']} failed (log: {r['measured']['log']}): "
                    f"{r['measured']['failed']}"
                )
        (work / "results.json").write_text(json.dumps(results, indent=2, default=str))
        print(
            f"\ntotal {time.perf_counter() - began:.0f} s"
            + (f"; runs and results.json in {work}" if args.workdir else "")
        )
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.path.insert(0, str(PROJECT))
    main()
