"""`python -m finetune.evaluate <run_dir> [data=FILE] [harness=TASKS] [options]`: did the fine-tune help?

The base and the fine-tuned model are measured on the same rows with the same code, and the report puts them side
by side: eval_report.md, eval_report.json and eval_report.png in the run directory (or out=), picked up by the
model card, which is re-rendered here.

- Rows: the run's own held-out split by default (reproduced from its config and seed and checked against the
  fingerprint recorded at training), or data=FILE read with the run's data template (template=, columns= to adapt).
- Loss and perplexity: mean negative log-likelihood per trained token (the response tokens, as in training).
- Questions and answers: greedy answers of both models to the first generate_rows prompts, scored with exact match,
  token F1, ROUGE-L and BLEU (finetune.metrics) against the reference answers.
- Labelled data (the template's `options`, or options=[A,B] / options_field=F here): each option is scored by its
  log-likelihood after the prompt, exactly as it would be trained (option + EOS); accuracy by the summed
  log-likelihood and by the log-likelihood per character (lm-evaluation-harness's acc / acc_norm).
- harness=lambada_openai,sciq,...: EleutherAI's lm-evaluation-harness on both models (finetune.harness); local
  task folders with harness_include=DIR.

An adapter is loaded once over its base and switched off for the base's numbers (peft's disable_adapter); a full
fine-tune or merged model is compared with its base loaded next to it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from finetune import console as cli
from finetune.console import Option
from finetune.errors import ConfigError, DataError
from finetune.runs import checkpoints, rundir

OPTIONS = [
    Option("data", list, [], "rows to evaluate (file, glob or Hub dataset id); default: the run's held-out split"),
    Option("template", str, None, "data template for data= (default: the run's)"),
    Option("columns", list, [], "template field=your column for data=, e.g. [instruction=question,output=answer]"),
    Option("options", list, [], "labelled data: the possible answers, e.g. [Yes,No] (default: the template's options)"),
    Option("options_field", str, None, "labelled data: the row field that lists each row's possible answers"),
    Option("limit", int, None, "evaluate only the first N rows"),
    Option("generate_rows", int, 64, "rows answered by both models for EM/F1/ROUGE/BLEU (0: none)"),
    Option("max_new_tokens", int, 128, "longest generated answer (generation also stops at EOS)"),
    Option("samples", int, 5, "prompts shown with both answers in the report"),
    Option("batch_size", int, 8, "rows per forward pass"),
    Option("merged", bool, False, "evaluate RUN/merged (python -m finetune.merge) instead of base + adapter"),
    Option("base", str, None, "base model folder or Hub id (default: the run's model.name_or_path)"),
    Option("dtype", str, None, "bfloat16 | float32 | float16 (default: the run's model.dtype)"),
    Option("harness", list, [], "lm-evaluation-harness tasks, e.g. [lambada_openai,sciq,piqa,arc_challenge]"),
    Option("harness_include", list, [], "folders with your own lm-evaluation-harness task YAMLs (local data)"),
    Option("harness_limit", int, None, "harness: at most N examples per task (a quick look; not comparable to papers)"),
    Option(
        "num_fewshot",
        int,
        None,
        "harness: few-shot examples (default: each task's own, zero-shot for the published table)",
    ),
    Option("out", str, None, "folder for eval_report.* (default: the run directory)"),
]


@dataclass
class EvalSet:
    """The rows to evaluate, tokenized the way training tokenized them."""

    source: str  # said in the report: "held-out split of the run" or the file names (never a full local path)
    rows: list[dict]  # checked rows (fields renamed to the template's)
    sequences: list[tuple[list[int], list[int]]]  # (input_ids, labels) per kept sample, for loss
    prompts: list[str]  # rendered generation prompt per row
    references: list[str]  # the last assistant message per row
    options: list[list[str]] = field(default_factory=list)  # per row, when labelled
    gold: list[int] = field(default_factory=list)  # index of the reference among the options
    option_sequences: list[list[tuple[list[int], list[int]]]] = field(default_factory=list)  # per row, per option
    warnings: list[str] = field(default_factory=list)  # said on stderr, in eval_report.json/.md and the model card
    heldout_check: dict | None = None  # the reproduced held-out split against the dataset fingerprint training recorded

    @property
    def labelled(self) -> bool:
        return bool(self.options)


def run(opts: dict) -> Path:
    """The CLI: check everything cheap (options, rows, harness task names), then load once and measure both sides."""
    from finetune.inference import generate

    for key in ("generate_rows", "samples", "max_new_tokens", "batch_size"):
        if opts[key] < (1 if key in ("max_new_tokens", "batch_size") else 0):
            raise ConfigError(
                f"{key}={opts[key]}: must be {'positive' if key in ('max_new_tokens', 'batch_size') else '0 or more'}"
            )
    target = rundir.locate(opts["target"], opts["merged"])
    if opts["harness"]:
        from finetune.evaluate import harness

        harness.resolve_tasks(opts["harness"], opts["harness_include"])
    loading = generate.plan(opts["target"], opts["merged"], base=opts["base"], dtype=opts["dtype"])
    evalset = build_evalset(target, loading.tokenizer, opts)
    out_dir = Path(opts["out"]).expanduser() if opts["out"] else (target.run_dir or target.weights)
    out_dir.mkdir(parents=True, exist_ok=True)
    for warning in evalset.warnings:
        cli.say(f"warning: {warning}")
    cli.say(
        f"evaluating on {len(evalset.rows)} rows ({evalset.source})"
        + (f", {len(evalset.options[0]) if evalset.options else 0}+ options each" if evalset.labelled else "")
    )
    cli.quiet_libraries()
    cli.say(
        f"loading {loading.weights}"
        + (f" with adapter {loading.first}" if loading.adapters else "")
        + f" ({loading.dtype})"
    )
    session = loading.load()
    results, answers = {}, {}
    for side, model in _sides(session, target, opts, loading.dtype):
        cli.say(f"measuring the {side} model")
        results[side], answers[side] = measure(model, session.tokenizer, evalset, opts)
    from finetune.evaluate import report as eval_report

    report = eval_report.build(target, evalset, results, answers, opts, loading.dtype)
    written = eval_report.write(out_dir, report)
    if out_dir.resolve() == target.weights.resolve():  # written into a sealed folder: recorded in its manifest
        checkpoints.update_manifest(out_dir, [Path(p).name for p in written])
    from finetune.adapters import card
    from finetune.runs import report as run_page

    card.refresh(target.run_dir, target.config)
    run_page.refresh(target.run_dir)  # the run's report.html shows the evaluation
    for line in eval_report.console_lines(report):
        cli.say(line)
    cli.say("report: " + ", ".join(str(p) for p in written))
    return out_dir / "eval_report.md"


def build_evalset(target: rundir.Target, tokenizer, opts: dict) -> EvalSet:
    """The rows to measure: data= read with the template, or the run's held-out split reproduced from its config."""
    from omegaconf import OmegaConf

    from finetune.data import templates

    config = target.config or {}
    template_name = opts["template"] or (
        str(target.template_path) if target.template_path else config.get("data", {}).get("template")
    )
    if not template_name:
        raise ConfigError(f"{target.weights}: no data template recorded; name one with template=NAME|PATH")
    template = templates.load(template_name)
    data_cfg = OmegaConf.create(config.get("data") or _default_data_config())
    if opts["data"]:
        columns = _columns(opts["columns"])
        spec = opts["data"] if len(opts["data"]) > 1 else opts["data"][0]
        data_cfg.update(
            {
                "path": spec,
                "eval_path": spec,
                "eval_split": None,
                "columns": columns,
                "packing": False,
                "max_dropped_fraction": 1.0,
                "hub_config": None,
                "revision": None,
            }
        )
        source = ", ".join(Path(str(s)).name for s in opts["data"])
    elif opts["template"] or opts["columns"]:
        raise ConfigError("template= and columns= describe data=FILE; the run's held-out split uses the run's template")
    else:
        if not (data_cfg.get("eval_path") or data_cfg.get("eval_split") or data_cfg.get("eval_fraction")):
            raise ConfigError(
                f"{target.run_dir}: the run kept no held-out split (data.eval_fraction=0); evaluate on data=FILE"
            )
        source = "held-out split of the run"
    return _evalset(target, tokenizer, template, data_cfg, source, opts, reproduced=not opts["data"])


def _evalset(target, tokenizer, template, data_cfg, source: str, opts: dict, reproduced: bool) -> EvalSet:
    from finetune.data.tokenize import prepare, prompt_text
    from finetune.models import fingerprint

    seed = (target.config or {}).get("seed", 42)
    try:
        prepared = prepare(data_cfg, tokenizer, template, seed)
    except DataError:
        _refuse_bad_rows(data_cfg, template, reproduced, target)  # each bad row once, with a fix evaluate takes
        raise
    warnings, heldout_check = [], None
    if reproduced and target.run_dir:
        recorded = rundir.read_json(target.run_dir / "run.json").get("dataset_fingerprint")
        now = fingerprint.dataset(prepared.train + prepared.eval, prepared.packed is not None)
        heldout_check = {
            "dataset_fingerprint_at_training": recorded,
            "dataset_fingerprint_now": now,
            "matches": None if not recorded else recorded == now,
        }
        if recorded and recorded != now:
            warnings.append(
                "the data named in the run's config.yaml changed since training (dataset fingerprint "
                f"{recorded[:12]}... at training, {now[:12]}... now): these held-out rows may not be the ones "
                "the run held out, and some may have been trained on"
            )
    rows = prepared.eval_rows[: opts["limit"]] if opts["limit"] else prepared.eval_rows
    wheres = {row["_where"] for row in rows}
    samples = [s for s in prepared.eval if s.where in wheres]
    if not rows:
        raise DataError(f"{source}: no rows left to evaluate (after the template's checks and data.max_length)")
    references = [_reference(template, row) for row in rows]
    evalset = EvalSet(
        source,
        rows,
        [(s.input_ids, s.labels) for s in samples],
        [prompt_text(tokenizer, template, row) for row in rows],
        references,
        warnings=warnings,
        heldout_check=heldout_check,
    )
    options = [str(o) for o in opts["options"]] or list(template.options)
    options_field = opts["options_field"] or template.options_field
    if options or options_field:
        evalset.options, evalset.gold = _labelled(rows, references, options, options_field, source)
        evalset.option_sequences = _option_sequences(tokenizer, template, rows, evalset.options)
    return evalset


COLUMNS_HINT = re.compile(r"data\.columns\.(\w+)=COLUMN")  # the training key; evaluate's is columns=[field=column]


def _refuse_bad_rows(data_cfg, template, reproduced: bool, target) -> None:
    """prepare() refused rows: list each bad row once (data= is read as both the train and the eval side there) with
    the fix in evaluate's own options; returns when the problem is not a bad row (the caller re-raises it)."""
    from finetune.data import sources

    specs = [data_cfg.path] if not reproduced else [data_cfg.path, data_cfg.eval_path]
    columns = dict(data_cfg.columns or {})
    bad, seen = [], set()
    for spec in dict.fromkeys(s for s in specs if s):
        read = sources.read_rows(
            spec,
            columns=columns,
            hub_config=data_cfg.hub_config,
            split=data_cfg.split,
            revision=data_cfg.revision,
            key="data",
            max_row_bytes=data_cfg.get("max_row_bytes") or sources.MAX_ROW_BYTES,
        )
        found = [(r.where, r.reason) for r in read.rejected]
        for row in read.rows:
            problems = template.check_row(row, columns)
            if problems:
                found.append((row["_where"], "; ".join(p.text for p in problems)))
        for where, detail in found:
            if where not in seen:
                seen.add(where)
                bad.append(f"{where}: " + COLUMNS_HINT.sub(r"columns=[\1=COLUMN]", detail))
    if not bad:
        return
    shown = bad[: sources.MAX_REPORTED] + (
        [f"... and {len(bad) - sources.MAX_REPORTED} more"] if len(bad) > sources.MAX_REPORTED else []
    )
    if reproduced:
        fix = (
            f"these rows are in the data named in {target.run_dir / 'config.yaml'} now, and training would have "
            "refused "
            "them: the data changed since training, so the run's held-out split cannot be reproduced. Evaluate on "
            "data=FILE (with template= and columns=[field=column] to fit it)"
        )
    else:
        fix = (
            "evaluate measures every row it is given: fix or remove these rows, or fit the template to your columns "
            "with columns=[field=column] (or another template=)"
        )
    raise DataError(f"{len(bad)} bad row(s):\n" + "\n".join(f"  {line}" for line in shown) + f"\n  fix: {fix}")


def _labelled(rows, references, options, options_field, source) -> tuple[list[list[str]], list[int]]:
    per_row, gold, problems = [], [], []
    for row, reference in zip(rows, references):
        choices = options if options else row.get(options_field)
        if not isinstance(choices, list) or len(choices) < 2:
            problems.append(f"{row['_where']}: field '{options_field}' must list at least two options, got {choices!r}")
            continue
        choices = [str(c) for c in choices]
        if reference.strip() not in [c.strip() for c in choices]:
            problems.append(f"{row['_where']}: the answer {reference.strip()!r} is not one of the options {choices}")
            continue
        per_row.append(choices)
        gold.append([c.strip() for c in choices].index(reference.strip()))
    if problems:
        more = f" (and {len(problems) - 20} more)" if len(problems) > 20 else ""
        raise DataError(
            [
                *problems[:20],
                f"{source}: {len(problems)} labelled row(s) cannot be scored{more}; fix the answers "
                "or the options (options=[...] / options_field= / the template's options)",
            ]
        )
    return per_row, gold


def _option_sequences(tokenizer, template, rows, options) -> list[list[tuple[list[int], list[int]]]]:
    """Per row, per option: the prompt and the option as training renders and tokenizes them (each piece on its own)."""
    from finetune.data.tokenize import render

    sequences = []
    for row, choices in zip(rows, options):
        conversation = template.conversation(row)
        last = max(i for i, m in enumerate(conversation) if m["role"] == "assistant")
        prompt = render(tokenizer, template, conversation[:last], add_generation_prompt=True)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        per_option = []
        for choice in choices:
            full = render(tokenizer, template, [*conversation[:last], {**conversation[last], "content": choice}])
            answer_ids = tokenizer(full[len(prompt) :], add_special_tokens=False)["input_ids"]
            per_option.append((prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids))
        sequences.append(per_option)
    return sequences


def measure(model, tokenizer, evalset: EvalSet, opts: dict) -> tuple[dict, dict]:
    """Every metric of one model on the set, and its answers (generated text or chosen option) per row."""
    from finetune.evaluate import metrics, scoring

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    scored = scoring.label_logprobs(model, evalset.sequences, opts["batch_size"], pad)
    tokens = sum(s.tokens for s in scored)
    loss = -sum(s.logprob for s in scored) / tokens
    result = {"loss": loss, "perplexity": math.exp(min(loss, 50))}
    answers: dict[int, str] = {}
    if evalset.labelled:
        flat = [seq for per_row in evalset.option_sequences for seq in per_row]
        flat_scores = iter(scoring.label_logprobs(model, flat, opts["batch_size"], pad))
        right = right_norm = 0
        for i, choices in enumerate(evalset.options):
            logps = [next(flat_scores).logprob for _ in choices]
            best = max(range(len(choices)), key=lambda k: logps[k])
            best_norm = max(range(len(choices)), key=lambda k: logps[k] / max(len(choices[k]), 1))
            right += best == evalset.gold[i]
            right_norm += best_norm == evalset.gold[i]
            answers[i] = choices[best]
        result.update(mc_accuracy=right / len(evalset.options), mc_accuracy_norm=right_norm / len(evalset.options))
    elif opts["generate_rows"] and any(evalset.prompts):
        count = min(opts["generate_rows"], len(evalset.rows))
        generated = scoring.greedy_answers(
            model, tokenizer, evalset.prompts[:count], opts["max_new_tokens"], opts["batch_size"]
        )
        result.update(metrics.text_metrics(generated, [r.strip() for r in evalset.references[:count]]))
        answers = dict(enumerate(generated))
    if opts["harness"]:
        from finetune.evaluate import harness

        result["harness"] = harness.run_tasks(
            model,
            tokenizer,
            opts["harness"],
            include_path=opts["harness_include"] or None,
            limit=opts["harness_limit"],
            num_fewshot=opts["num_fewshot"],
            batch_size=opts["batch_size"],
        )
    return result, answers


def _sides(session, target: rundir.Target, opts: dict, dtype: str):
    """("base", model) then ("finetuned", model): the adapter switched off and on, or the base loaded beside."""
    if session.adapters:
        with session.model.disable_adapter():
            yield "base", session.model
        yield "finetuned", session.model
        return
    base = _load_base(target, opts["base"], dtype)
    yield "base", base
    del base
    yield "finetuned", session.model


def _load_base(target: rundir.Target, override: str | None, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM

    from finetune.models import neo_attention

    source = rundir.base_source(target, override)
    cli.say(f"loading the base {source} to compare with")
    trust = bool((target.config or {}).get("model", {}).get("trust_remote_code", False))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(
        source,
        dtype=getattr(torch, dtype) if dtype != "auto" else "auto",
        trust_remote_code=trust,
        use_safetensors=True,
        device_map=device,
    )
    neo_attention.enable(model)  # the same attention as the fine-tuned side
    return model.eval()


def _reference(template, row: dict) -> str:
    conversation = template.conversation(row)
    return [m for m in conversation if m["role"] == "assistant"][-1]["content"]


def _columns(pairs: list) -> dict:
    columns = {}
    for pair in pairs:
        field_name, sep, column = str(pair).partition("=")
        if not sep or not field_name or not column:
            raise ConfigError(
                f"columns: '{pair}' is not FIELD=COLUMN (e.g. columns=[instruction=question,output=answer])"
            )
        columns[field_name.strip()] = column.strip()
    return columns


def _default_data_config() -> dict:
    from dataclasses import asdict

    from finetune.config.schema import DataConfig

    return asdict(DataConfig(path=""))


def main(argv: list[str] | None = None) -> None:
    cli.main(run, __doc__, OPTIONS, positional="target", argv=argv)


if __name__ == "__main__":
    main()
