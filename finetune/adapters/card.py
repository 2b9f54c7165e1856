"""The model card (README.md) that goes with every adapter, full model, merged model and export.

Hub metadata is a YAML mapping built as data and dumped with a dumper that double-quotes any string with a line
break or a non-printable character, so a hostile name cannot close the front matter or add keys: the YAML parses
back to exactly the metadata we meant. `base_model` is a Hub id or absent, never a local path; local paths in the
resolved config shown in the card are reduced to their file names. Nothing here reads the environment: a Hub
token cannot reach a card.

The card is rebuilt from the run directory (config.yaml, run.json, metrics.json, eval_report.json when the
evaluation has run) each time it is written: at the end of training, by the merge and again before a push.
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import yaml

from finetune.adapters import serving

CAUTIONS = {
    "legal": (
        "Not legal advice. Outputs can be wrong, out of date or wrong for your jurisdiction, and can cite law "
        "that does not exist. A qualified lawyer must review anything this model writes before it is relied on; "
        "do not use it to decide anyone's rights."
    ),
    "medical": (
        "Not medical advice and not a medical device. Outputs can be wrong or unsafe, and can state made-up "
        "facts with confidence. Do not use it for diagnosis or treatment decisions; a qualified clinician must "
        "review anything it writes before it reaches a patient. In an emergency, contact emergency services."
    ),
}
RELATION = {"adapter": "adapter", "merged": "merge", "model": "finetune", "export": "quantized"}
LIBRARY = {"gguf": "gguf", "ctranslate2": "ctranslate2", "onnx": "onnx"}  # an export's Hub library_name


class _Dumper(yaml.SafeDumper):
    pass


def _represent_str(dumper, value: str):
    unsafe = any(not ch.isprintable() for ch in value)  # line breaks, \u2028, control characters
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style='"' if unsafe else None)


_Dumper.add_representer(str, _represent_str)


def metadata(config: dict, kind: str) -> dict:
    """Hub YAML metadata for an adapter ("adapter"), a full fine-tune ("model"), a merged model ("merged") or an
    export (finetune export: library_name and a tag set by render from its record)."""
    card, model = config.get("card", {}), config.get("model", {})
    hub_id = model.get("hub_id") or (None if _looks_local(model.get("name_or_path", "")) else model.get("name_or_path"))
    strategy = config.get("strategy", {}).get("name", "lora")
    data_path = config.get("data", {}).get("path")
    datasets = list(card.get("datasets") or [])
    for path in data_path if isinstance(data_path, list) else [data_path]:
        if isinstance(path, str) and _is_hub_id(path) and path not in datasets:
            datasets.append(path)
    objective = (config.get("objective") or {}).get("name", "sft")
    tags = ["neo-finetune", strategy, model.get("family", "")] + [t for t in card.get("tags") or [] if t]
    tags += [objective] if objective != "sft" else []
    if card.get("domain", "general") != "general":
        tags.append(card["domain"])
    meta = {}
    if hub_id:
        meta["base_model"] = hub_id
        meta["base_model_relation"] = RELATION[kind]
    meta.update(
        library_name="peft" if kind == "adapter" else "transformers",
        license=card.get("license", "apache-2.0"),
        language=list(card.get("language") or ["en"]),
        pipeline_tag="text-generation",
        tags=list(dict.fromkeys(t for t in tags if t)),
    )
    if datasets:
        meta["datasets"] = datasets
    return meta


def render(run_dir: Path | None, config: dict, kind: str, extra: dict | None = None, repo_id: str | None = None) -> str:
    """The whole README.md: front matter, then the card body."""
    meta = metadata(config, kind)
    export = (extra or {}).get("export")
    if export:
        meta["library_name"] = LIBRARY[export["format"]]
        meta["tags"] = list(dict.fromkeys([*meta["tags"], export["format"], export["quant"]]))
    front = yaml.dump(meta, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=float("inf"))
    record = _read_json(run_dir / "run.json") if run_dir else {}
    body = _body(run_dir, config, kind, meta, record, extra or {}, repo_id or "YOUR_NAME/THIS_REPO")
    return f"---\n{front}---\n\n{body}"


def write(folder: Path, run_dir: Path | None, config: dict, kind: str, extra: dict | None = None) -> Path:
    """README.md (the card) and serving.json in `folder`."""
    family = config.get("model", {}).get("family", "")
    dora = config.get("strategy", {}).get("name") == "dora" or bool(config.get("strategy", {}).get("use_dora"))
    (folder / "serving.json").write_text(
        json.dumps(serving.report(family, kind, dora, _exports(run_dir, extra)), indent=2) + "\n", encoding="utf-8"
    )
    path = folder / "README.md"
    path.write_text(render(run_dir, config, kind, extra), encoding="utf-8")
    return path


def refresh(run_dir: Path | None, config: dict | None) -> None:
    """Rebuild the cards and serving.json of a run's weights and merged model (after an evaluation or an export):
    their manifests record these two files' new hashes and nothing else."""
    from finetune.runs import checkpoints, rundir

    if not run_dir or not config:
        return
    for folder, kind in (
        (run_dir / rundir.ADAPTER_DIR, "adapter"),
        (run_dir / rundir.MODEL_DIR, "model"),
        (run_dir / rundir.MERGED_DIR, "merged"),
    ):
        if (folder / "README.md").is_file():
            extra = rundir.read_json(folder / "merge_report.json") if kind == "merged" else None
            with contextlib.suppress(OSError):
                write(folder, run_dir, config, kind, extra=extra)
                checkpoints.update_manifest(folder, ["README.md", "serving.json"])  # only these two changed


def _body(run_dir, config: dict, kind: str, meta: dict, record: dict, extra: dict, repo: str) -> str:
    card, model, strategy, data = (config.get(k, {}) for k in ("card", "model", "strategy", "data"))
    title = _line(card.get("model_name") or (run_dir.name if run_dir else "fine-tuned model"))
    base = (
        meta.get("base_model")
        or f"a local {model.get('family', '')} checkpoint ({_line(Path(str(model.get('name_or_path', ''))).name)})"
    )
    what = {
        "adapter": f"A {strategy.get('name', 'lora').upper()} adapter for {base}",
        "merged": f"{base} with a {strategy.get('name', 'lora').upper()} adapter merged into its weights",
        "model": f"A full fine-tune of {base}",
        "export": f"A fine-tune of {base} exported with `finetune export`",
    }[kind]
    description = _line(
        card.get("description")
        or f"{what}, trained with neo-finetune on "
        f"{_data_name(data)} rendered with the `{_line(Path(str(data.get('template', ''))).stem)}` template."
    )
    parts = [f"# {title}", "", description, ""]
    if card.get("domain") in CAUTIONS:
        parts += [f"> **Caution — {card['domain']} use.** {CAUTIONS[card['domain']]}", ""]
    usage = _export_usage(extra["export"]) if kind == "export" else _usage(kind, meta, repo)
    parts += usage + _training(config, record) + _results(run_dir, record, extra)
    parts += _serving_section(model.get("family", ""), kind, strategy, _exports(run_dir, extra))
    parts += _limitations(card.get("domain", "general"))
    parts += [
        "## Resolved training config",
        "",
        "Local paths are reduced to file names.",
        "",
        "```yaml",
        yaml.safe_dump(redact(config), sort_keys=False, allow_unicode=True).rstrip(),
        "```",
        "",
    ]
    versions = record.get("versions") or {}
    if versions:
        parts += ["## Framework versions", ""] + [f"- {_line(k)} {_line(v)}" for k, v in versions.items()] + [""]
    return "\n".join(parts)


def _usage(kind: str, meta: dict, repo: str) -> list[str]:
    """Loading code; `repo` is the repository being pushed to (a placeholder in the run directory's own card)."""
    base = meta.get("base_model", "BASE_MODEL")
    if kind == "adapter":
        code = [
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'base = AutoModelForCausalLM.from_pretrained("{base}", dtype="bfloat16")',
            f'model = PeftModel.from_pretrained(base, "{repo}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{repo}")  # carries the training chat template',
        ]
    else:
        code = [
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'model = AutoModelForCausalLM.from_pretrained("{repo}", dtype="bfloat16")',
            f'tokenizer = AutoTokenizer.from_pretrained("{repo}")  # carries the training chat template',
        ]
    code += [
        'prompt = tokenizer.apply_chat_template([{"role": "user", "content": "..."}], tokenize=False, '
        "add_generation_prompt=True)",
        'ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)',
        "print(tokenizer.decode(model.generate(**ids, max_new_tokens=200)[0], skip_special_tokens=True))",
    ]
    return [
        "## Use it",
        "",
        "```python",
        *code,
        "```",
        "",
        (
            "Prompts must be rendered with the saved chat template (the format the model was trained on); "
            "`python -m finetune.generate RUN_DIR prompt=...` does that for you."
        ),
        "",
    ]


def _export_usage(export: dict) -> list[str]:
    """How to run an export in its own runtime (the files are the ones listed in its export.json)."""
    files = [f["name"] for f in export["files"]]
    if export["format"] == "gguf":
        gguf = next(n for n in files if n.endswith(".gguf"))
        lines = [
            "```sh",
            f"llama-cli -m {gguf} -cnv   # the training chat template is in the GGUF metadata",
            "ollama create my-model -f Modelfile && ollama run my-model   # TEMPLATE and stop tokens as in training",
            "```",
        ]
    elif export["format"] == "ctranslate2":
        lines = [
            "```python",
            "import ctranslate2, transformers",
            'generator = ctranslate2.Generator(".", device="cpu")',
            'tokenizer = transformers.AutoTokenizer.from_pretrained(".")  # carries the training chat template',
            'prompt = tokenizer.apply_chat_template([{"role": "user", "content": "..."}], tokenize=False, '
            "add_generation_prompt=True)",
            "tokens = tokenizer.convert_ids_to_tokens(tokenizer(prompt).input_ids)",
            "result = generator.generate_batch([tokens], max_length=200, sampling_topk=1, "
            "include_prompt_in_result=False)",
            "print(tokenizer.decode(result[0].sequences_ids[0]))",
            "```",
        ]
    else:
        lines = [
            "```python",
            "from finetune.export import onnx_model  # or onnxruntime: inputs and outputs in onnx_config.json",
            'runtime = onnx_model.load(".")',
            "```",
        ]
    return ["## Use it", "", f"Runs with {export['runs_with']}.", "", *lines, ""]


def _exports(run_dir: Path | None, extra: dict | None) -> list[dict]:
    """The run's exports, and the one this card is written for (not yet in the run's exports/)."""
    current = (extra or {}).get("export")
    return [*(r for r in serving.exports_of(run_dir) if r != current), *([current] if current else [])]


def _training(config: dict, record: dict) -> list[str]:
    model, strategy, data, trainer = (config.get(k, {}) for k in ("model", "strategy", "data", "trainer"))
    rows = [
        ("base", _line(model.get("hub_id") or Path(str(model.get("name_or_path", ""))).name)),
        ("revision", _line(model.get("revision"))),
        ("strategy", _line(strategy.get("name"))),
        *_objective_rows(config.get("objective") or {}),
    ]
    if strategy.get("name") != "full":
        rows += [
            ("rank / alpha", f"{strategy.get('r')} / {strategy.get('lora_alpha')}"),
            ("target modules", _modules(strategy.get("target_modules"))),
            (
                "LoRA initialization",
                None if strategy.get("init_lora_weights", True) is True else strategy["init_lora_weights"],
            ),
            ("LoRA+ learning-rate ratio (B / A)", strategy.get("loraplus_lr_ratio")),
        ]
    rows += [("NEFTune noise alpha", trainer.get("neftune_noise_alpha"))]
    rows += [
        ("template", _line(Path(str(data.get("template", ""))).stem)),
        ("max length", data.get("max_length")),
        ("packing", data.get("packing")),
        ("learning rate", trainer.get("learning_rate")),
        (
            "batch per device x accumulation",
            f"{trainer.get('per_device_train_batch_size')} x {trainer.get('gradient_accumulation_steps')}",
        ),
        ("epochs / max steps", f"{trainer.get('num_train_epochs')} / {trainer.get('max_steps')}"),
        ("precision", "bf16" if trainer.get("bf16") else "fp16" if trainer.get("fp16") else model.get("dtype")),
        ("seed", config.get("seed")),
        ("optimizer steps", record.get("global_steps")),
        ("training time", f"{record['train_seconds']:.0f} s" if record.get("train_seconds") else None),
    ]
    lines = ["## Training", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {_cell(v)} |" for k, v in rows if v not in (None, "", "None / None")]
    accounting = record.get("data") or {}
    if accounting:
        lines += ["", "Data accounting:", "", "| | |", "|---|---|"]
        lines += [
            f"| {_cell(k.replace('_', ' '))} | {_cell(v)} |" for k, v in accounting.items() if not isinstance(v, dict)
        ]
    return lines + [""]


def _objective_rows(objective: dict) -> list[tuple[str, str]]:
    """What the run optimised, with the objective's own keys; the run it started from by name (never a path)."""
    name = objective.get("name", "sft")
    if name == "sft":
        return []
    settings = ", ".join(f"{k}={v}" for k, v in objective.items() if k not in ("name", "init_from"))
    rows = [("objective", _line(f"{name.upper()}" + (f" ({settings})" if settings else "")))]
    if objective.get("init_from"):
        rows.append(("started from the adapter of run", _line(Path(str(objective["init_from"])).name)))
    return rows


def _modules(targets) -> str:
    # "all-linear" is peft's shorthand
    return targets if isinstance(targets, str) else ", ".join(map(str, targets or []))


def _results(run_dir, record: dict, extra: dict) -> list[str]:
    import math

    lines = ["## Results", ""]
    before, after = record.get("eval_loss_before"), record.get("eval_loss_after")
    preference = record.get("preference_eval") or {}
    if before is not None and after is not None and preference:
        lines += [
            "| held-out pairs | before training | after |",
            "|---|---|---|",
            f"| {_cell(preference.get('objective', ''))} loss | {before:.4f} | {after:.4f} |",
            *(
                f"| {label} | {_number(values.get('before'))} | {_number(values.get('after'))} |"
                for label, values in preference.get("metrics", {}).items()
            ),
            "",
        ]
    elif before is not None and after is not None:
        lines += [
            "| held-out | base | fine-tuned |",
            "|---|---|---|",
            f"| loss | {before:.4f} | {after:.4f} |",
            f"| perplexity | {math.exp(min(before, 50)):.2f} | {math.exp(min(after, 50)):.2f} |",
            "",
        ]
    if record.get("train_loss") is not None:
        lines += [f"Final training loss: {record['train_loss']:.4f}.", ""]
    report = _read_json(run_dir / "eval_report.json") if run_dir else {}
    if report.get("metrics"):
        from finetune.evaluate import report as eval_report

        data = report.get("data", {})
        lines += [
            f"Evaluation (`python -m finetune.evaluate`) on {_cell(data.get('rows'))} rows "
            f"({_cell(data.get('source'))}):",
            "",
            *eval_report.warning_lines(report),
            *eval_report.metric_table(report),
            "",
        ]
        harness_rows = eval_report.harness_table(report)
        if harness_rows:
            lines += ["lm-evaluation-harness:", "", *harness_rows, ""]
    if extra.get("gate"):
        gate = extra["gate"]
        verdict = "passed" if gate["passed"] else "FAILED"
        lines += [
            (
                f"Merge check ({gate['mode']}): max abs difference {gate['max_abs_diff']:.2e} between the merged model "
                f"and base + adapter (tolerance {gate['tolerance']:.2e}) — {verdict}."
            ),
            "",
        ]
    if extra.get("export"):
        from finetune.export import gate as export_gate

        export = extra["export"]
        verdict = "passed" if export["valid"] else "FAILED"
        check = export_gate.summary(export["gate"])
        lines += [f"Export check ({export['format']} {export['quant']}): {check} — {verdict}.", ""]
    return lines if len(lines) > 2 else lines + ["No held-out evaluation was run.", ""]


def _serving_section(family: str, kind: str, strategy: dict, exports: list[dict]) -> list[str]:
    dora = strategy.get("name") == "dora" or bool(strategy.get("use_dora"))
    rows = serving.report(family, kind, dora, exports)
    lines = ["## Serving", "", "| engine | loads this as is | note |", "|---|---|---|"]
    lines += [f"| {r['engine']} | {r['loads']} | {_cell(r['note'])} |" for r in rows]
    if kind == "adapter" and any(r["loads"] == "no" for r in rows):
        lines += [
            "",
            "Engines that cannot load the adapter can serve the merged model: `python -m finetune.merge RUN_DIR`.",
        ]
    if any(r["engine"] == serving.SERVE and r["loads"] == "yes" for r in rows):
        lines += [
            "",
            "`finetune serve` (neo-finetune's OpenAI-compatible server) serves it as it is: `finetune serve FOLDER` "
            "(the run directory, or this folder downloaded), then any OpenAI client with "
            "`base_url=http://127.0.0.1:8000/v1`.",
        ]
    return lines + [""]


def _limitations(domain: str) -> list[str]:
    lines = [
        "## Intended use and limitations",
        "",
        (
            "Intended for research and for assistants whose outputs a person reviews. The base model was pretrained on "
            "the Pile (web text, books, code, papers) without safety tuning: it can produce false, biased, offensive "
            "or "
            "private-looking text, and fine-tuning on a small dataset does not remove that. It writes English best. "
            "Evaluate it on your own data before use, and do not deploy it where a wrong answer can cause harm without "
            "a person checking it."
        ),
    ]
    if domain in CAUTIONS:
        lines += ["", CAUTIONS[domain]]
    return lines + [""]


def redact(value):
    """The config with every local path reduced to its file name (`/home/me/data/x.jsonl` -> `x.jsonl`)."""
    if isinstance(value, dict):
        return {k: redact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    if isinstance(value, str) and _looks_local(value):
        return Path(value).name
    return value


def _looks_local(text: str) -> bool:
    return bool(re.match(r"^(/|~|\.{1,2}/|[A-Za-z]:[\\/])", text)) or Path(text).expanduser().exists() and "/" in text


def _is_hub_id(text: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", text)) and not _looks_local(text) and not Path(text).suffix


def _data_name(data: dict) -> str:
    path = data.get("path")
    names = path if isinstance(path, list) else [path]
    shown = [f"`{_line(p)}`" if _is_hub_id(str(p)) else f"`{_line(Path(str(p)).name)}`" for p in names if p]
    return ", ".join(shown) or "its data"


def _number(value) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "-"


def _line(value) -> str:
    """One line of plain text: line breaks and control characters become spaces."""
    return " ".join("".join(ch if ch.isprintable() else " " for ch in str(value)).split())


def _cell(value) -> str:
    return _line(value).replace("|", "\\|")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
