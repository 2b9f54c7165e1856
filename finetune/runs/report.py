"""`finetune report RUN|SWEEP_DIR`: report.html, one self-contained page that says what a run did (or compares the
jobs of a sweep), for a browser, offline, on a phone.

Why one file: a run directory is copied, zipped and mailed around, so its page must open from anywhere with nothing
beside it: images inline (base64 PNG), CSS inline, no JavaScript, and a Content-Security-Policy that lets no request
leave the page. Every string read from the run's files is HTML-escaped (finetune.runs.page): a run name or a
generated sample is data, never markup.

Each section appears only when its source exists: config.yaml, run.json (data accounting, eval losses), loss.png,
eval_report.json/.png, samples.json, inspect/*/attention.json/.png, exports/*/export.json, serving.json and the model
card (README.md) of adapter/ or model/. Training writes the page last; evaluate, export and inspect attention rebuild
it (`refresh`: a failure there is said on stderr, never fatal). The page is written through a temporary file and a
rename, and carries `<meta name="generator" content="neo-finetune">`: a report.html without it is someone else's
and is never replaced. A sweep directory (finetune.train.sweep: jobs 0/, 1/, ... each a run directory) gets one
page: the summary table, links to the jobs' own pages, and every job's loss curves overlaid in one figure.
"""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path
from urllib.parse import quote

import yaml

from finetune import console as cli
from finetune.console import Option
from finetune.errors import ConfigError
from finetune.runs import page
from finetune.runs.page import esc

PAGE = "report.html"
OPTIONS: list[Option] = []  # the page has no settings: it shows what the run directory holds


def main(argv: list[str] | None = None) -> Path | None:
    return cli.main(run, __doc__, OPTIONS, positional="target", argv=argv)


def run(opts: dict) -> Path:
    """The command: build the page of a run or a sweep directory and print its path."""
    path = build(Path(opts["target"]).expanduser())
    print(path)
    return path


def build(folder: Path) -> Path:
    """FOLDER/report.html: a run directory's page, or a sweep directory's comparison of its jobs."""
    if (folder / "run.json").is_file() or (folder / "config.yaml").is_file():
        return write(folder, run_page(folder))
    if folder.is_dir() and any(folder.glob("*/run.json")):
        return write(folder, sweep_page(folder))
    raise ConfigError(f"{folder}: neither a run directory (run.json) nor a sweep directory (0/run.json, ...)")


def refresh(run_dir: Path | None) -> Path | None:
    """Rebuild a run's page after training, an evaluation, an export or an attention map. The page is a view of the
    run: a failure to write it is said on stderr and never fails the command that changed the run."""
    if run_dir is None:
        return None
    try:
        path = build(Path(run_dir))
    except Exception as err:  # noqa: BLE001 - the run's own outputs are written; the page only shows them
        cli.say(f"warning: {Path(run_dir) / PAGE} not written: {err}")
        return None
    cli.say(f"run page: {path}")
    return path


def write(folder: Path, html: str) -> Path:
    """Through a temporary file and a rename; a report.html without our generator mark is never replaced."""
    path = folder / PAGE
    if path.exists() or path.is_symlink():
        try:
            ours = page.GENERATOR in path.read_text(encoding="utf-8", errors="replace")[:4096]
        except OSError:
            ours = False
        if not ours:
            raise ConfigError(
                f"{path}: exists and was not written by neo-finetune (no {page.GENERATOR}); it is never replaced: "
                "move it away to get the run's page"
            )
    tmp = folder / f".{PAGE}.tmp"
    tmp.write_text(html, encoding="utf-8")
    os.replace(tmp, path)
    return path


def run_page(run_dir: Path) -> str:
    record, config = _json(run_dir / "run.json"), _yaml(run_dir / "config.yaml")
    sections = [
        ("config", "Configuration", _config, config, record),
        ("data", "Data", _data, record),
        ("loss", "Loss curves", page.image, run_dir / "loss.png", "train and eval loss against the optimizer step"),
        ("evaluation", "Before and after training", _evaluation, run_dir, record),
        ("samples", "Held-out samples", _samples, run_dir),
        ("attention", "Attention maps", _attention, run_dir),
        ("exports", "Exports", _exports, run_dir),
        ("serving", "Serving", _serving, run_dir),
        ("card", "Model card", _card, run_dir),
    ]
    status = [str(record[k]) for k in ("status", "started", "finished") if record.get(k)]
    lead = f"<p class=meta>{esc(' · '.join(status))}</p>" if status else ""
    if record.get("error"):
        lead += f"<pre class=fail>{esc(record['error'])}</pre>"
    return page.document(f"Run {run_dir.name}", lead, [(i, t, _section(f, *a)) for i, t, f, *a in sections])


def _section(render, *args) -> str:
    """One section's HTML ('' when its source is absent); a file it cannot read is named, the page still written."""
    try:
        return render(*args)
    except Exception as err:  # noqa: BLE001 - a damaged file costs its section, not the page
        return f"<p class=fail>could not be shown: {esc(type(err).__name__)}: {esc(err)}</p>"


def _config(config: dict, record: dict) -> str:
    from finetune.adapters.card import redact

    config = redact(config)  # local paths become file names, as in the card: the page gets shared
    model, strategy, data, trainer = (config.get(k) or {} for k in ("model", "strategy", "data", "trainer"))
    given = (str(o).partition("=") for o in record.get("overrides") or [])
    overrides = " ".join(f"{key}{sep}{redact(value)}" for key, sep, value in given) or "-"
    return page.pairs(
        [
            ("model", model.get("hub_id") or model.get("name_or_path") or redact(record.get("base_model"))),
            ("family / revision", _joined(model, "family", "revision")),
            ("strategy", strategy.get("name") or record.get("strategy")),
            ("rank / alpha", _joined(strategy, "r", "lora_alpha")),
            ("target modules", strategy.get("target_modules")),
            ("data", data.get("path")),
            ("data template", Path(str(data["template"])).stem if data.get("template") else None),
            ("max length / packing", _joined(data, "max_length", "packing")),
            ("learning rate / scheduler", _joined(trainer, "learning_rate", "lr_scheduler_type")),
            (
                "batch per device x accumulation",
                _joined(trainer, "per_device_train_batch_size", "gradient_accumulation_steps", " x "),
            ),
            ("epochs / max steps", _joined(trainer, "num_train_epochs", "max_steps")),
            ("precision", record.get("precision")),
            ("optimizer", (record.get("optimizer") or {}).get("name")),
            ("seed", config.get("seed", record.get("seed"))),
            ("preset / overrides", f"{record['preset']} / {overrides}" if record.get("preset") else None),
            ("trainable parameters", _share(record.get("trainable_parameters"), record.get("total_parameters"))),
            ("optimizer steps", record.get("global_steps")),
            ("training time (s)", record.get("train_seconds")),
        ]
    )


def _joined(values: dict, first: str, second: str, joiner: str = " / ") -> str | None:
    if values.get(first) is None and values.get(second) is None:
        return None
    return joiner.join(page.cell(values[k]) if values.get(k) is not None else "-" for k in (first, second))


def _share(part, whole) -> str | None:
    if not isinstance(part, int) or not isinstance(whole, int) or not whole:
        return None
    return f"{part:,} of {whole:,} ({part / whole:.2%})"


def _data(record: dict) -> str:
    accounting = record.get("data")
    if not isinstance(accounting, dict):
        return ""
    return page.pairs((key.replace("_", " "), value) for key, value in _flat(accounting))


def _flat(values: dict, prefix: str = ""):
    """(key, value) of a nested dict, nested keys joined by spaces ("token_length p50"); an empty dict is "none"."""
    for key, value in values.items():
        if isinstance(value, dict) and value:
            yield from _flat(value, f"{prefix}{key} ")
        else:
            yield f"{prefix}{key}", "none" if value == {} else value


def _evaluation(run_dir: Path, record: dict) -> str:
    parts = []
    before, after = record.get("eval_loss_before"), record.get("eval_loss_after")
    if isinstance(before, (int, float)) and isinstance(after, (int, float)):
        change = f"{(after - before) / before:+.1%}" if before else ""
        preference = record.get("preference_eval") or {}
        rows = [[f"{preference.get('objective', '')} loss".strip(), f"{before:.4f}", f"{after:.4f}", change]]
        if preference:  # a preference objective's loss is no language-model loss: its reward numbers instead
            rows += [[label, *_before_after(values)] for label, values in (preference.get("metrics") or {}).items()]
        else:
            rows.append(["perplexity", *[f"{math.exp(min(loss, 50)):.2f}" for loss in (before, after)], ""])
        parts += ["<p>Held-out split, measured by training (run.json):</p>"]
        parts += [page.table(["", "base", "fine-tuned", "change"], rows)]
    report = _json(run_dir / "eval_report.json")
    if report.get("metrics"):
        from finetune.evaluate import report as eval_report

        data = report.get("data") or {}
        parts.append(f"<p>finetune evaluate, {esc(data.get('rows'))} rows ({esc(data.get('source'))}):</p>")
        parts += [f"<p class=fail>{page.inline(line)}</p>" for line in eval_report.warning_lines(report) if line]
        parts.append(page.markdown("\n".join(eval_report.metric_table(report))))
        parts.append(page.markdown("\n".join(eval_report.harness_table(report))))
    parts.append(page.image(run_dir / "eval_report.png", "base and fine-tuned side by side"))
    return "".join(parts)


def _before_after(values) -> list[str]:
    values = values if isinstance(values, dict) else {}
    return [f"{v:.4f}" if isinstance(v, (int, float)) else "-" for v in (values.get("before"), values.get("after"))] + [
        ""
    ]


def _samples(run_dir: Path) -> str:
    found = _json(run_dir / "samples.json")
    samples = [s for s in found.get("samples") or [] if isinstance(s, dict)]
    decoding = found.get("decoding") if samples else None
    parts = [f"<p class=meta>decoding: {esc(page.cell(decoding))}</p>"] if decoding else []
    for number, sample in enumerate(samples, 1):
        parts.append(f"<h3>Prompt {number}</h3><pre>{esc(sample.get('prompt', ''))}</pre><div class=pair>")
        for side in ("before", "after"):
            parts.append(f"<div><b>{side} training</b><pre>{esc(sample.get(side) or '(empty)')}</pre></div>")
        parts.append("</div>")
    return "".join(parts)


def _attention(run_dir: Path) -> str:
    """Each `finetune inspect attention` of the run: its prompt, facts, per-layer numbers and picture."""
    parts = []
    for record_path in sorted((run_dir / "inspect").glob("*/attention.json")):
        record, name = _json(record_path), record_path.parent.name
        facts = [(k, record.get(k)) for k in ("tokens", "family", "window", "dtype", "layers", "heads")]
        facts.insert(0, ("weights", Path(str(record.get("target", ""))).name))  # not a local path: the page is shared
        parts += [f"<h3>{esc(name)}</h3><pre>{esc(record.get('prompt', ''))}</pre>", page.pairs(facts)]
        layers = [row for row in record.get("per_layer") or [] if isinstance(row, dict)]
        models = [m for m in ("fine_tuned", "base") if any(m in row for row in layers)]
        head = [
            "layer",
            *(f"{m.replace('_', '-')} {n}" for m in models for n in ("distance (tokens)", "entropy (nats)")),
        ]
        rows = []
        for row in layers:
            rows.append([row.get("title", row.get("layer"))])
            for side in (row.get(m) or {} for m in models):
                rows[-1] += [side.get("mean_distance"), side.get("entropy")]
        parts += [page.table(head, rows), page.image(record_path.parent / "attention.png", f"attention maps, {name}")]
    return "".join(parts)


def _exports(run_dir: Path) -> str:
    """Each `finetune export` of the run (a failed one too, in NAME.invalid/): what it is and what its gate said."""
    parts = []
    for record_path in sorted((run_dir / "exports").glob("*/export.json")):
        record = _json(record_path)
        gate = record.get("gate") if isinstance(record.get("gate"), dict) else {}
        size = sum(f.get("bytes", 0) for f in record.get("files") or [] if isinstance(f, dict)) / 2**20
        facts = [(k, record.get(k)) for k in ("format", "quant", "engine", "runs_with")] + [("MiB", f"{size:.1f}")]
        parts += [f"<h3>{esc(record_path.parent.name)}: {page.verdict(bool(record.get('valid')))}</h3>"]
        parts += [page.pairs(facts + _gate(gate)), *(f"<p class=fail>{esc(r)}</p>" for r in gate.get("reasons") or [])]
    return "".join(parts)


def _gate(gate: dict) -> list[tuple[str, object]]:
    """The export gate's numbers (finetune.export.gate.check), whichever of them it measured."""
    prompts = gate.get("prompts") or []
    greedy = gate.get("greedy_identical")
    return [
        ("gate", f"{gate.get('engine')} vs {gate.get('reference')}" if gate else None),
        ("max abs logit difference", gate.get("max_abs_diff")),
        ("tolerance", gate.get("tolerance")),
        ("top-1 agreement", gate.get("top1_agreement")),
        ("mean log-prob gap", gate.get("mean_logprob_gap")),
        ("thresholds", gate.get("thresholds")),
        (
            "greedy identical",
            f"{greedy}/{len(prompts)} prompts, {gate.get('tokens')} tokens" if greedy is not None else None,
        ),
    ]


def _serving(run_dir: Path) -> str:
    for folder in ("adapter", "model"):
        rows = _read(run_dir / folder / "serving.json")
        if isinstance(rows, list) and rows:
            body = [
                [row.get("engine"), row.get("loads"), " — ".join(str(row[k]) for k in ("note", "source") if row.get(k))]
                for row in rows
                if isinstance(row, dict)
            ]
            return f"<p class=meta>{folder}/serving.json</p>" + page.table(["engine", "loads it as is", "note"], body)
    return ""


def _card(run_dir: Path) -> str:
    for folder in ("adapter", "model"):
        path = run_dir / folder / "README.md"
        if path.is_file():
            card = page.markdown(path.read_text(encoding="utf-8", errors="replace"))
            return f"<details><summary>{folder}/README.md</summary>{card}</details>"
    return ""


def sweep_page(sweep_dir: Path) -> str:
    """The sweep's table (finetune.train.sweep.collect: best first), each job linked to its own page, and one
    figure of every job's loss."""
    from finetune.train import sweep

    rows = sweep.collect(sweep_dir)
    varying = [
        key
        for key in dict.fromkeys(k for r in rows for k in r["overrides"])
        if len({r["overrides"].get(key) for r in rows}) > 1 or len(rows) == 1
    ]
    head = ["job", *varying, "status", "steps", "train loss", "eval loss before", "eval loss after", "train s"]
    body = []
    for row in rows:
        after = row["best_eval_loss"] if row["best_eval_loss"] is not None else row["eval_loss_after"]
        outcome = [
            row["status"],
            row["global_steps"],
            row["train_loss"],
            row["eval_loss_before"],
            after,
            row["train_seconds"],
        ]
        body.append([row["job"], *(row["overrides"].get(k, "") for k in varying), *outcome])
    html = page.table(head, body)
    for row in rows:  # a relative link: the sweep folder travels whole
        if (sweep_dir / row["job"] / PAGE).is_file():
            link = f'<a href="{esc(quote(row["job"]))}/{PAGE}">{esc(row["job"])}</a>'
            html = html.replace(f"<tr><td>{esc(row['job'])}</td>", f"<tr><td>{link}</td>", 1)
    best = next((r for r in rows if not math.isnan(sweep.objective(r))), None)
    if best is not None:
        html += f"<p>best: job {esc(best['job'])}, loss {sweep.objective(best):.4f}</p>"
    for row in rows:
        if row["status"] != "completed":
            html += f"<p class=fail>job {esc(row['job'])}: {esc(row['status'])} (exit {esc(row['exit_code'])}): "
            html += f"{esc(row['error'] or 'see its train.log')}</p>"
    figure = page.png(_overlay(sweep_dir, rows, varying), "every job's train and eval loss")
    lead = f"<p class=meta>{len(rows)} jobs, best first</p>"
    return page.document(f"Sweep {sweep_dir.name}", lead, [("jobs", "Jobs", html), ("loss", "Loss curves", figure)])


def _overlay(sweep_dir: Path, rows: list[dict], varying: list[str]) -> bytes | None:
    """One figure: each job's train loss (line) and eval loss (dashed, the base at step 0) in the job's colour,
    from its metrics.json; None when no job logged a loss."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 5), dpi=100)
    FigureCanvasAgg(figure)
    axes, drawn = figure.add_subplot(), False
    for number, row in enumerate(rows):
        metrics = _json(sweep_dir / row["job"] / "metrics.json")
        history = [h for h in metrics.get("history") or [] if isinstance(h, dict) and "step" in h]
        before = (metrics.get("eval_before") or {}).get("eval_loss")
        evals = [(0, before)] if before is not None else []
        evals += [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
        train = [(h["step"], h["loss"]) for h in history if "loss" in h]
        settings = " ".join(f"{k}={row['overrides'].get(k, '')}" for k in varying)
        label = f"job {row['job']} {settings}".strip().replace("$", r"\$")  # no matplotlib math mode
        if train:
            axes.plot(*zip(*train), color=f"C{number % 10}", label=f"{label} train")
        if evals:
            axes.plot(*zip(*evals), "o--", color=f"C{number % 10}", label=f"{label} eval")
        drawn = drawn or bool(train or evals)
    if not drawn:
        return None
    axes.set(xlabel="optimizer step", ylabel="cross-entropy (nats/token)", title=sweep_dir.name.replace("$", r"\$"))
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _read(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, ValueError):
        return None


def _json(path: Path) -> dict:
    found = _read(path)
    return found if isinstance(found, dict) else {}


def _yaml(path: Path) -> dict:
    try:
        found = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, yaml.YAMLError):
        return {}
    return found if isinstance(found, dict) else {}


if __name__ == "__main__":
    main()
