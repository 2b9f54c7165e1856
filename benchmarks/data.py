"""Rows/s and tokens/s of the data pipeline (template + tokenize + loss mask + length policy + packing) vs trl's own
dataset preparation, measured in the same run.

    python benchmarks/data.py                       # 50,000 rows, templates alpaca and chatml, max_length 512
    python benchmarks/data.py --rows 5000           # a quick check of the script itself
    python benchmarks/data.py --profile             # also print a cProfile of our path (top functions)

Rows are the shipped demo rows (finetune/demo_data/legal_medical_qa.jsonl) cycled to --rows, each made unique by
its row number, so nothing can be served from a cache. The tokenizer is the tiny byte-level BPE of
`python -m finetune.tiny --arch neo` (built once into the work folder, with its random model for trl's trainer).
- alpaca: one instruction / optional input / output per row.
- chatml: a multi-turn conversation per row: a system message, the row's question and answer, then a follow-up
  ("Say that in one sentence.") answered by the answer's first sentence: two trained assistant messages per row.

Timed, per template:
- ours: `finetune.data.tokenize_many` (chat template, tokenizer, loss mask) + `fit_length` (data.overlength=drop)
  + `finetune.data.packing.pack`, on rows already read: what `finetune.data.prepare` does after reading. Reading and
  checking the JSONL (`sources.read_rows` + `Template.check_row`) is timed on its own line.
- floor: the Rust tokenizer alone (`backend_tokenizer.encode_batch_fast`, ids only) on each row's whole rendered
  text, nothing else: the cost of tokenizing itself, which bounds any pipeline on this tokenizer and machine.
- trl: `SFTTrainer._prepare_dataset` of a real `SFTTrainer` (built on the tiny model), which is the whole data path
  of a plain TRL script: `SFTTrainer(model, args=SFTConfig(max_length=512, packing=True), train_dataset=ds)`.
  alpaca as a prompt/completion dataset (prompt = the Alpaca prompt text; trl adds EOS, tokenizes prompt and
  prompt+completion per row, completion_only_loss); chatml as a conversational `messages` dataset with
  assistant_only_loss=True, using our chatml template with `{% generation %}` markers added (what trl needs to mask
  the non-assistant turns; it renders the same text). Both pack with trl's default best-fit decreasing ("bfd"), which
  truncates a row over max_length where ours (data.overlength=drop) drops it.
Prints a markdown table, the ratio ours / trl of rows/s, ours against the floor and the issue's target (20,000 rows/s),
and the load average (the machine may be shared: timings of one run are comparable with each other, not across runs).
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

PROJECT = Path(__file__).resolve().parents[1]
DEMO = PROJECT / "finetune" / "demo_data" / "legal_medical_qa.jsonl"
SYSTEM = "You are a careful legal and medical assistant."
TEMPLATES = ("alpaca", "chatml")
TARGET_ROWS_PER_SECOND = 20_000  # the performance issue's target for the pipeline on a 2-core machine


def demo_rows(n: int, template: str) -> list[dict]:
    """n rows in the template's format, cycling the demo rows; every text carries its row number (all unique)."""
    base = [json.loads(line) for line in DEMO.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = []
    for i in range(n):
        a = base[i % len(base)]
        if template == "alpaca":
            rows.append(
                {
                    "instruction": f"{a['instruction']} (row {i})",
                    "input": a.get("input") or "",
                    "output": f"{a['output']} (row {i})",
                }
            )
        else:
            question = a["instruction"] + (f"\n\n{a['input']}" if a.get("input") else "")
            rows.append(
                {
                    "messages": [
                        {"role": "system", "content": SYSTEM},
                        {"role": "user", "content": f"{question} (row {i})"},
                        {"role": "assistant", "content": f"{a['output']} (row {i})"},
                        {"role": "user", "content": f"Say that in one sentence. (row {i})"},
                        {"role": "assistant", "content": f"{first_sentence(a['output'])} (row {i})"},
                    ]
                }
            )
    return rows


def first_sentence(text: str) -> str:
    return text.split(". ")[0].rstrip(".") + "."


def build_tiny(work: Path) -> Path:
    out = work / "tiny-neo"
    if not (out / "tokenizer.json").is_file():
        subprocess.run(
            [sys.executable, "-m", "finetune.tiny", "--arch", "neo", "--out", str(out)],
            cwd=PROJECT,
            check=True,
            capture_output=True,
        )
    return out


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.pad_token = tokenizer.eos_token  # the GPT-Neo family policy (finetune.models.load_tokenizer)
    return tokenizer


def time_read(rows: list[dict], template, work: Path) -> float:
    """Seconds to read the rows back from a JSONL file and check them against the template (prepare's first steps)."""
    from finetune.data import sources

    path = work / f"rows-{template.name}.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    started = time.perf_counter()
    read = sources.read_rows(str(path))
    bad = [row for row in read.rows if template.check_row(row)]
    seconds = time.perf_counter() - started
    assert len(read.rows) == len(rows) and not bad and not read.rejected
    return seconds


def run_ours(tokenizer, template, rows: list[dict], max_length: int) -> dict:
    from finetune.data import packing
    from finetune.data.tokenize import fit_length, tokenize_many

    times = {}
    started = time.perf_counter()
    samples = tokenize_many(tokenizer, template, rows)
    times["tokenize"] = time.perf_counter() - started
    t = time.perf_counter()
    kept, dropped = [], 0
    for sample in samples:
        fitted, reason = fit_length(sample, max_length, "drop")
        kept += fitted
        dropped += bool(reason)
    times["fit"] = time.perf_counter() - t
    t = time.perf_counter()
    packed = packing.pack(kept, max_length)
    times["pack"] = time.perf_counter() - t
    times["seconds"] = time.perf_counter() - started
    return {
        **times,
        "tokens": sum(len(s.input_ids) for s in kept),
        "trained": sum(s.trained for s in kept),
        "packed_rows": len(packed),
        "dropped": dropped,
    }


def time_floor(tokenizer, template, rows: list[dict]) -> tuple[float, int]:
    """Seconds of the tokenizer alone on each row's whole rendered text (one batched call), and its token count: no
    template, no mask, no packing; what any pipeline on this tokenizer must spend."""
    from finetune.data.tokenize import render

    texts = [render(tokenizer, template, template.conversation(row)) for row in rows]
    started = time.perf_counter()
    backend = tokenizer.backend_tokenizer  # the Rust tokenizer, ids only: the fastest call this tokenizer has
    ids = [encoding.ids for encoding in backend.encode_batch_fast(texts, add_special_tokens=False)]
    return time.perf_counter() - started, sum(map(len, ids))


def trl_dataset(template_name: str, rows: list[dict], tokenizer, template) -> list[dict]:
    """The same rows as a plain TRL script would hand them to SFTTrainer."""
    if template_name == "alpaca":
        from finetune.data.tokenize import prompt_text

        return [{"prompt": prompt_text(tokenizer, template, row), "completion": row["output"]} for row in rows]
    return [{"messages": row["messages"]} for row in rows]


def generation_marked(chat_template: str) -> str:
    """Our chatml template with trl's `{% generation %}` markers around each assistant message (content + EOS)."""
    marked = chat_template.replace(
        "{{ message.content }}{{ eos_token }}",
        "{% generation %}{{ message.content }}{{ eos_token }}{% endgeneration %}",
        1,
    )
    assert marked != chat_template
    return marked


def make_trainer(model_dir: Path, tokenizer, work: Path, template_name: str, max_length: int):
    import logging

    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    logging.getLogger("trl").setLevel(logging.ERROR)
    conversational = template_name != "alpaca"
    args = SFTConfig(
        output_dir=str(work / f"trl-{template_name}"),
        max_length=max_length,
        packing=True,
        report_to=[],
        use_cpu=True,
        assistant_only_loss=conversational,
        save_strategy="no",
        logging_strategy="no",
    )
    first = (
        [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]
        if conversational
        else [{"prompt": "q", "completion": "a"}]
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(first), processing_class=tokenizer)


def run_trl(trainer, tokenizer, dataset_rows: list[dict]) -> dict:
    from datasets import Dataset

    dataset = Dataset.from_list(dataset_rows)
    started = time.perf_counter()
    packed = trainer._prepare_dataset(dataset, tokenizer, trainer.args, True, None, "train")
    seconds = time.perf_counter() - started
    lengths = packed["seq_lengths"]
    labels = packed["labels"]
    return {
        "seconds": seconds,
        "tokens": sum(sum(row) for row in lengths),
        "packed_rows": len(packed),
        "trained": sum(sum(1 for t in row if t != -100) for row in labels),
    }


def profile_ours(tokenizer, template, rows: list[dict], max_length: int, top: int = 18) -> None:
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    run_ours(tokenizer, template, rows, max_length)
    profiler.disable()
    print(f"\ncProfile of our path, template {template.name}, {len(rows):,} rows (top {top} by cumulative time):")
    pstats.Stats(profiler).sort_stats("cumulative").print_stats(top)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--templates", nargs="+", default=list(TEMPLATES), choices=TEMPLATES)
    parser.add_argument(
        "--repeat", type=int, default=3, help="our path: best of this many runs (trl: one run, it is slow)"
    )
    parser.add_argument("--no-trl", action="store_true", help="skip the trl baseline (profiling our path)")
    parser.add_argument("--profile", action="store_true", help="print a cProfile of our path per template")
    parser.add_argument(
        "--workdir", default=None, help="where to build the tiny tokenizer/model (default: a temporary folder)"
    )
    args = parser.parse_args()

    import datasets
    import tokenizers
    import transformers
    import trl

    from finetune.data import templates as data_templates

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="data-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        model_dir = build_tiny(work)
        print(
            f"{args.rows:,} rows per template, max_length {args.max_length}, tiny GPT-Neo byte-level BPE (vocab 1024); "
            f"transformers {transformers.__version__}, trl {trl.__version__}, tokenizers {tokenizers.__version__}, "
            f"datasets {datasets.__version__}, {os.cpu_count()} CPUs; load average at the start "
            f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}"
        )
        lines, ratios, summary = [], [], []
        for name in args.templates:
            template = data_templates.load(name)
            rows = demo_rows(args.rows, name)
            read_seconds = time_read(rows, template, work)
            rows = [{**row, "_where": f"rows.jsonl:{i + 1}"} for i, row in enumerate(rows)]
            tokenizer = load_tokenizer(model_dir)
            ours = min(
                (run_ours(tokenizer, template, rows, args.max_length) for _ in range(max(1, args.repeat))),
                key=lambda r: r["seconds"],
            )
            n = len(rows)
            lines.append(
                f"| {name} | neo-finetune: tokenize_many + fit_length + pack (best of {args.repeat}) | "
                f"{n / ours['seconds']:,.0f} | {ours['tokens'] / ours['seconds']:,.0f} | {ours['seconds']:.2f} | "
                f"{ours['tokens']:,} / {ours['trained']:,} | {ours['packed_rows']:,} |"
            )
            lines.append(
                f"| {name} | (of which template + tokenize + mask {ours['tokenize']:.2f} s, fit_length "
                f"{ours['fit']:.2f} s, "
                f"pack {ours['pack']:.2f} s; {ours['dropped']:,} rows over max_length dropped) | | | | | |"
            )
            floor, floor_tokens = min(
                (time_floor(tokenizer, template, rows) for _ in range(max(1, args.repeat))), key=lambda r: r[0]
            )
            verdict = "met" if n / ours["seconds"] >= TARGET_ROWS_PER_SECOND else "NOT met"
            summary.append(
                f"{name}: ours {n / ours['seconds']:,.0f} rows/s = {floor / ours['seconds']:.0%} of the "
                "tokenizer-alone floor "
                f"({n / floor:,.0f} rows/s); target >= {TARGET_ROWS_PER_SECOND:,} rows/s {verdict}"
            )
            lines.append(
                f"| {name} | (floor: the Rust tokenizer alone on each row's whole rendered text, one batched call) | "
                f"{n / floor:,.0f} | {floor_tokens / floor:,.0f} | {floor:.2f} | {floor_tokens:,} | |"
            )
            lines.append(
                f"| {name} | (reading + checking the JSONL, before the above: sources.read_rows + check_row) | "
                f"{n / read_seconds:,.0f} | | {read_seconds:.2f} | | |"
            )
            if not args.no_trl:
                trl_tokenizer = load_tokenizer(model_dir)
                if name != "alpaca":
                    trl_tokenizer.chat_template = generation_marked(template.chat_template)
                    sample = rows[0]["messages"]
                    assert trl_tokenizer.apply_chat_template(sample, tokenize=False) == tokenizer.apply_chat_template(
                        sample, chat_template=template.chat_template, tokenize=False
                    )
                dataset_rows = trl_dataset(name, rows, tokenizer, template)
                trainer = make_trainer(model_dir, trl_tokenizer, work, name, args.max_length)
                baseline = run_trl(trainer, trl_tokenizer, dataset_rows)
                how = (
                    "prompt/completion, completion_only_loss"
                    if name == "alpaca"
                    else "messages, assistant_only_loss with {% generation %}"
                )
                lines.append(
                    f"| {name} | trl SFTTrainer._prepare_dataset ({how}, packing bfd) | {n / baseline['seconds']:,.0f} "
                    "| "
                    f"{baseline['tokens'] / baseline['seconds']:,.0f} | {baseline['seconds']:.2f} | "
                    f"{baseline['tokens']:,} / {baseline['trained']:,} | {baseline['packed_rows']:,} |"
                )
                ratios.append(
                    f"{name}: ours / trl rows/s = {baseline['seconds'] / ours['seconds']:.1f}x "
                    f"(ours {n / ours['seconds']:,.0f} rows/s, trl {n / baseline['seconds']:,.0f} rows/s)"
                )
            if args.profile:
                profile_ours(tokenizer, template, rows, args.max_length)
        print()
        print(
            f"| template | pipeline ({args.rows:,} rows, max_length {args.max_length}) | rows/s | tokens/s | seconds | "
            f"tokens / trained | packed rows |"
        )
        print("|---|---|---:|---:|---:|---:|---:|")
        print("\n".join(lines))
        print()
        print("\n".join(ratios + summary))
        print(f"load average (1, 5, 15 min) at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(PROJECT))
    main()
