"""eval_report.json / .md / .png: base and fine-tuned side by side, in the forms people read and tools parse.

The JSON is the record (the model card renders its `metrics` and `harness` tables from it); the Markdown is for
people (tables, then a handful of prompts with both answers); the PNG is one chart of both.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

# metric -> (label, higher is better, shown as)
METRICS = {
    "loss": ("held-out loss (nats/token)", False, "{:.4f}"),
    "perplexity": ("held-out perplexity", False, "{:.2f}"),
    "exact_match": ("exact match", True, "{:.3f}"),
    "token_f1": ("token F1", True, "{:.3f}"),
    "rougeL": ("ROUGE-L", True, "{:.3f}"),
    "bleu": ("BLEU (0-100)", True, "{:.2f}"),
    "mc_accuracy": ("multiple-choice accuracy", True, "{:.3f}"),
    "mc_accuracy_norm": ("multiple-choice accuracy (per-character log-likelihood)", True, "{:.3f}"),
}
SIDES = ("base", "finetuned")


def build(target, evalset, results: dict, answers: dict, opts: dict, dtype: str) -> dict:
    """The report as data: metrics per side, harness tables, sample answers, and what was measured how."""
    from finetune.runs import artifacts

    metrics = {name: {side: results[side][name] for side in SIDES} for name in METRICS if name in results["base"]}
    report = {
        "schema": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": {
            "run": target.run_dir.name if target.run_dir else target.weights.name,
            "kind": "merged" if target.weights.name == "merged" else target.kind,
            "base": _base_name(target),
        },
        "data": {
            "source": evalset.source,
            "rows": len(evalset.rows),
            "loss_samples": len(evalset.sequences),
            "task": "multiple_choice" if evalset.labelled else "generation",
            "generated_rows": 0 if evalset.labelled else min(opts["generate_rows"], len(evalset.rows)),
        },
        "metrics": metrics,
        "samples": _samples(evalset, answers, opts["samples"]),
        "settings": {
            "dtype": dtype,
            "decoding": "greedy",
            "max_new_tokens": opts["max_new_tokens"],
            "batch_size": opts["batch_size"],
        },
        "versions": artifacts.versions(),
    }
    if evalset.heldout_check is not None:  # the run's held-out split, reproduced: does it match what training held out?
        report["data"]["heldout_check"] = evalset.heldout_check
    if evalset.warnings:
        report["data"]["warnings"] = list(evalset.warnings)
    if evalset.labelled:
        report["data"]["options"] = sorted({o for row in evalset.options for o in row})[:20]
    if "harness" in results["base"]:
        report["harness"] = {side: results[side]["harness"] for side in SIDES}
    return report


def write(out_dir: Path, report: dict) -> list[Path]:
    """eval_report.json, .md and .png in out_dir (each written whole, then renamed into place)."""
    paths = [out_dir / "eval_report.json", out_dir / "eval_report.md", out_dir / "eval_report.png"]
    _replace(
        paths[0], lambda p: p.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    )
    _replace(paths[1], lambda p: p.write_text(markdown(report), encoding="utf-8"))
    _replace(paths[2], lambda p: chart(report, p))
    return paths


def warning_lines(report: dict) -> list[str]:
    """What makes these numbers doubtful (the held-out data changed since training), as Markdown lines (also used by
    the model card); empty when there is nothing to say."""
    warnings = report.get("data", {}).get("warnings") or []
    return [f"**Warning:** {warning.rstrip('.')}." for warning in warnings] + ([""] if warnings else [])


def metric_table(report: dict) -> list[str]:
    """Markdown rows: metric | base | fine-tuned | change (also used by the model card)."""
    lines = ["| metric | base | fine-tuned | change |", "|---|---|---|---|"]
    for name, values in report.get("metrics", {}).items():
        label, _, shown = METRICS.get(name, (name, True, "{:.4f}"))
        base, tuned = values.get("base"), values.get("finetuned")
        lines.append(f"| {label} | {shown.format(base)} | {shown.format(tuned)} | {_change(name, base, tuned)} |")
    return lines


def harness_table(report: dict) -> list[str]:
    """Markdown rows of the lm-evaluation-harness results (empty without them)."""
    if "harness" not in report:
        return []
    from finetune.evaluate import harness

    return harness.table(report["harness"]["base"], report["harness"]["finetuned"])


def markdown(report: dict) -> str:
    model, data = report["model"], report["data"]
    lines = [
        f"# Evaluation: {model['run']}",
        "",
        f"Base `{model['base']}` against the fine-tuned model ({model['kind']}) on {data['rows']} rows "
        f"({data['source']}), {report['created']}.",
        "",
        *warning_lines(report),
        *metric_table(report),
        "",
    ]
    if data["task"] == "generation" and data["generated_rows"]:
        lines += [
            f"Exact match, token F1 (SQuAD normalisation), ROUGE-L and BLEU score greedy answers (at most "
            f"{report['settings']['max_new_tokens']} new tokens) to the first {data['generated_rows']} prompts "
            "against the reference answers.",
            "",
        ]
    if data["task"] == "multiple_choice":
        lines += [
            "Each option is scored by its log-likelihood after the prompt; the most likely option is the answer.",
            "",
        ]
    harness_rows = harness_table(report)
    if harness_rows:
        lines += ["## lm-evaluation-harness", "", *harness_rows, ""]
    if report["samples"]:
        lines += ["## Answers side by side", ""]
        for i, sample in enumerate(report["samples"], 1):
            lines += [
                f"### {i}",
                "",
                "Prompt:",
                "",
                _fence(sample["prompt"]),
                "",
                f"Reference: {_quote(sample['reference'])}",
                "",
                f"Base: {_quote(sample['base'])}",
                "",
                f"Fine-tuned: {_quote(sample['finetuned'])}",
                "",
            ]
    lines.append(f"Settings: {json.dumps(report['settings'])}. Written by `python -m finetune.evaluate`.")
    return "\n".join(lines) + "\n"


def chart(report: dict, path: Path) -> None:
    """Two panels: perplexity (lower is better) and the 0..1 scores (higher is better), base beside fine-tuned."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = report["metrics"]
    scores = {METRICS[n][0]: v for n, v in metrics.items() if n in METRICS and METRICS[n][1] and n != "bleu"}
    for task, values in _harness_accuracies(report).items():
        scores[task] = values
    fig, axes = plt.subplots(1, 2 if scores else 1, figsize=(10 if scores else 5, 4), dpi=100, squeeze=False)
    _bars(axes[0][0], {"perplexity": metrics["perplexity"]}, "held-out perplexity (lower is better)")
    if scores:
        _bars(axes[0][1], scores, "scores (higher is better)")
        axes[0][1].set_ylim(0, 1)
    fig.suptitle(f"{report['model']['run']}: base vs fine-tuned")
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def console_lines(report: dict) -> list[str]:
    out = []
    for name, values in report["metrics"].items():
        label, _, shown = METRICS[name]
        out.append(f"{label}: {shown.format(values['base'])} -> {shown.format(values['finetuned'])}")
    return out


def _bars(ax, groups: dict, title: str) -> None:
    names = list(groups)
    width = 0.38
    for k, (side, colour) in enumerate((("base", "#9aa5b1"), ("finetuned", "#2f6db5"))):
        xs = [i + (k - 0.5) * width for i in range(len(names))]
        ax.bar(
            xs,
            [groups[n][side] for n in names],
            width,
            label="fine-tuned" if side == "finetuned" else side,
            color=colour,
        )
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)


def _harness_accuracies(report: dict) -> dict:
    found = {}
    for task, values in report.get("harness", {}).get("base", {}).get("tasks", {}).items():
        for metric in ("acc", "acc_norm", "exact_match"):
            if isinstance(values["metrics"].get(metric), (int, float)):
                tuned = report["harness"]["finetuned"]["tasks"][task]["metrics"][metric]
                found[f"{task} {metric}"] = {"base": values["metrics"][metric], "finetuned": tuned}
                break
    return found


def _samples(evalset, answers: dict, count: int) -> list[dict]:
    return [
        {
            "prompt": evalset.prompts[i],
            "reference": evalset.references[i].strip(),
            "base": answers["base"].get(i, ""),
            "finetuned": answers["finetuned"].get(i, ""),
        }
        for i in range(min(count, len(evalset.rows)))
        if i in answers["base"]
    ]


def _change(name: str, base, tuned) -> str:
    if not base:
        return f"{tuned - base:+.4g}"
    better = METRICS.get(name, (name, True))[1]
    relative = (tuned - base) / abs(base)
    arrow = "better" if (relative > 0) == better and relative else ("worse" if relative else "same")
    return f"{relative:+.1%} ({arrow})"


def _base_name(target) -> str:
    from finetune.runs import rundir

    record = target.base or {}
    if record.get("hub_id"):
        return record["hub_id"]
    try:
        source = rundir.base_source(target, None)
    except Exception:  # noqa: BLE001 - a name for the report only
        return "base"
    return Path(source).name if Path(source).exists() else source


def _fence(text: str) -> str:
    ticks = "````" if "```" in text else "```"
    return f"{ticks}\n{text.rstrip()}\n{ticks}"


def _quote(text: str) -> str:
    return " ".join(text.split()) if text.strip() else "(empty)"


def _replace(path: Path, write) -> None:
    partial = path.with_name(path.name + ".partial")
    write(partial)
    partial.replace(path)
