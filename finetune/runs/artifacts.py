"""What a run directory holds besides the weights, so it describes itself.

    run.json          status, timings, versions, seed, data accounting, before/after eval loss (finetune.runs.record)
    config.yaml       the fully resolved config the run used
    data_template.yaml the template the data was rendered with (also saved as the tokenizer's chat template)
    metrics.json      every logged value (train loss, eval loss, learning rate, ...) and the before/after evals
    loss.png          train and eval loss against the optimizer step
    samples.json      held-out prompts with the generation before and after training
    rejected_rows.jsonl rows that did not train (unreadable, invalid, too long), each with where, reason and raw text

No pickles: transformers writes `training_args.bin` (a pickle that can hold a Hub token) next to every save;
`clean_weights_folder` swaps it for a JSON copy with token fields masked, and replaces the local base-model path
peft writes into adapter_config.json and its README with a public name.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
from pathlib import Path

import yaml

TRAINING_ARGS_PICKLE = "training_args.bin"


def write_json(path: Path, data: dict) -> None:
    """Write through a temporary file and rename, so a crash never leaves half a JSON file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """One JSON object per line, written atomically like write_json."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in rows), encoding="utf-8")
    os.replace(tmp, path)


def write_config(run_dir: Path, resolved: dict, template_path: Path) -> None:
    (run_dir / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False), encoding="utf-8")
    shutil.copyfile(template_path, run_dir / "data_template.yaml")


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for package in (
        "neo-finetune",
        "torch",
        "transformers",
        "peft",
        "trl",
        "accelerate",
        "datasets",
        "hydra-core",
        "deepspeed",
    ):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    return found


def clean_weights_folder(directory: Path, args, local_base: Path | None, public_base: str) -> None:
    """Make a saved adapter/model/checkpoint folder safe to share.

    - transformers' pickled `training_args.bin` (it can hold a Hub token) becomes `training_args.json`, tokens masked;
    - peft writes the local base path into adapter_config.json and README.md: it becomes `public_base`.
    """
    pickle = directory / TRAINING_ARGS_PICKLE
    if pickle.exists():
        pickle.unlink()
    (directory / "training_args.json").write_text(args.to_json_string(), encoding="utf-8")
    if local_base is None:
        return
    for name in ("adapter_config.json", "README.md"):
        path = directory / name
        if path.is_file():
            text = path.read_text(encoding="utf-8")
            for local in sorted({str(local_base), str(local_base.resolve())}, key=len, reverse=True):
                text = text.replace(json.dumps(local)[1:-1], public_base).replace(local, public_base)
            path.write_text(text, encoding="utf-8")


def config_hash(resolved: dict) -> str:
    """sha256 of the resolved config (keys sorted): equal hashes, equal configs."""
    return hashlib.sha256(json.dumps(resolved, sort_keys=True, default=str).encode()).hexdigest()


def write_metrics(run_dir: Path, history: list[dict], **evals) -> None:
    write_json(run_dir / "metrics.json", {**evals, "history": history})


REWARD_CURVES = (  # trl's preference metrics in the log history -> the legend of loss.png's second panel
    ("rewards/margins", "train margin"),
    ("rewards/accuracies", "train accuracy"),
    ("eval_rewards/margins", "eval margin"),
    ("eval_rewards/accuracies", "eval accuracy"),
)


def plot_loss(run_dir: Path, history: list[dict], eval_before: float | None = None) -> None:
    """loss.png: train loss per logging step, eval loss per evaluation (the untouched base at step 0); a preference
    objective's run adds a panel of its reward margin and preference accuracy (train and held-out)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    evals = [(0, eval_before)] if eval_before is not None else []  # train() starts a fresh log history
    evals += [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    rewards = {
        label: [(h["step"], h[key]) for h in history if isinstance(h.get(key), (int, float))]
        for key, label in REWARD_CURVES
    }
    rewards = {label: points for label, points in rewards.items() if points}
    fig, axes = plt.subplots(1, 2 if rewards else 1, figsize=(12 if rewards else 7, 4), dpi=100, squeeze=False)
    ax = axes[0][0]
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss" if rewards else "cross-entropy (nats/token)")
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    if rewards:
        panel = axes[0][1]
        for label, points in rewards.items():
            panel.plot(*zip(*points), "o-" if label.startswith("eval") else "-", label=label)
        panel.set_xlabel("optimizer step")
        panel.set_title("reward margin (chosen - rejected) and preference accuracy")
        panel.grid(alpha=0.3)
        panel.legend()
    fig.tight_layout()
    fig.savefig(run_dir / "loss.png")
    plt.close(fig)
