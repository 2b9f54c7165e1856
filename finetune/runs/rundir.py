"""Find what a path given to merge / generate / push holds: a run directory, an adapter folder or a full model.

A run directory describes itself (train.py): `adapter/` (PEFT layout, with `base_model.json`, the base it was
trained on) or `model/` (full fine-tuning), `merged/` once merged, `config.yaml` (the resolved config) and
`data_template.yaml`. The tools also accept an adapter or model folder on its own (copied elsewhere, or
downloaded from the Hub); then the base comes from `base_model.json` or must be named with `base=`.
A run that did not finish (run.json not `completed`, final weights absent or without MANIFEST.json) is refused
(IntegrityError, exit 3) naming its status, its newest committed checkpoint and the fixes;
`RUN/checkpoints/checkpoint-N`
is accepted as a target (the run's config, template and recorded base fingerprint).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from finetune.errors import ConfigError, IntegrityError

ADAPTER_DIR, MODEL_DIR, MERGED_DIR = "adapter", "model", "merged"
CHECKPOINTS_DIR = "checkpoints"  # RUN/checkpoints/checkpoint-N: committed with a MANIFEST.json (finetune.checkpoints)
BASE_RECORD = "base_model.json"  # written into adapter/ and model/ at the end of training (fingerprint.base_record)
INVALID_SUFFIX = ".invalid"  # a merge that failed its numerical gate is left as merged.invalid/


@dataclass
class Target:
    kind: str  # "adapter" or "model"
    weights: Path  # the adapter folder, or a folder with config.json and full weights
    run_dir: Path | None  # the run directory it belongs to, if any
    config: dict | None  # the run's resolved config.yaml
    base: dict | None  # base_model.json: the base an adapter was trained on

    @property
    def template_path(self) -> Path | None:
        """The data template the run rendered its training data with (None outside a run directory)."""
        path = self.run_dir / "data_template.yaml" if self.run_dir else None
        return path if path and path.is_file() else None

    @property
    def checkpoint(self) -> bool:
        """A training checkpoint (RUN/checkpoints/checkpoint-N) rather than the run's final weights."""
        return self.run_dir is not None and self.weights.parent == self.run_dir / CHECKPOINTS_DIR


def locate(path: str | Path, merged: bool = False) -> Target:
    """A run directory (its adapter, its full model, or with merged=True its merged model), or a weights folder."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise ConfigError(
            f"{path}: no such directory; give a run directory (output_dir of a run), an adapter folder "
            "or a model folder"
        )
    if (path / "run.json").is_file() or (
        (path / "config.yaml").is_file() and ((path / ADAPTER_DIR).is_dir() or (path / MODEL_DIR).is_dir())
    ):
        return _in_run(path, merged)
    if merged:
        raise ConfigError(f"{path}: merged=true needs a run directory (with merged/ from python -m finetune.merge)")
    if _is_checkpoint(path):
        return _checkpoint(path)
    run_dir = path.parent if (path.parent / "config.yaml").is_file() and (path.parent / "run.json").is_file() else None
    if run_dir is not None and path.name in (ADAPTER_DIR, MODEL_DIR):
        _refuse_unfinished(run_dir, path)
    if (path / "adapter_config.json").is_file():
        return Target("adapter", path, run_dir, _config(run_dir), _base_record(path))
    if (path / "config.json").is_file():
        _refuse_invalid(path)
        return Target("model", path, run_dir, _config(run_dir), _base_record(path))
    raise ConfigError(
        f"{path}: neither a run directory (run.json), an adapter (adapter_config.json) nor a model (config.json)"
    )


def _in_run(run_dir: Path, merged: bool) -> Target:
    config = _config(run_dir)
    if merged:
        folder = run_dir / MERGED_DIR
        _refuse_invalid(folder)
        if not (folder / "config.json").is_file():
            raise ConfigError(f"{run_dir}: no merged model in {folder}; run python -m finetune.merge {run_dir} first")
        return Target("model", folder, run_dir, config, _base_record(run_dir / ADAPTER_DIR))
    _refuse_unfinished(run_dir, next((run_dir / d for d in (ADAPTER_DIR, MODEL_DIR) if (run_dir / d).exists()), None))
    if (run_dir / ADAPTER_DIR / "adapter_config.json").is_file():
        return Target("adapter", run_dir / ADAPTER_DIR, run_dir, config, _base_record(run_dir / ADAPTER_DIR))
    if (run_dir / MODEL_DIR / "config.json").is_file():
        return Target("model", run_dir / MODEL_DIR, run_dir, config, _base_record(run_dir / MODEL_DIR))
    status = read_json(run_dir / "run.json").get("status")
    raise ConfigError(
        f"{run_dir}: no trained weights ({ADAPTER_DIR}/ or {MODEL_DIR}/); run status: {status}. "
        "Finish (or resume) the run first"
    )


def _refuse_unfinished(run_dir: Path, weights: Path | None) -> None:
    """A torn run: run.json says it did not complete (running, preempted, failed) and its final weights folder is
    absent or has no MANIFEST.json (written last, after run.json says completed): whatever is there is not the
    trained model. IntegrityError (exit 3) naming the status, the newest committed checkpoint and the fixes."""
    from finetune.runs import checkpoints

    status = read_json(run_dir / "run.json").get("status") if (run_dir / "run.json").is_file() else None
    if status in (None, "completed") or (weights is not None and (weights / checkpoints.MANIFEST).is_file()):
        return
    how = (
        "still training, or killed before it finished"
        if status == "running"
        else "stopped by a preemption signal"
        if status == "preempted"
        else f"it ended with {status}"
    )
    what = (
        f"{weights} is incomplete (no {checkpoints.MANIFEST}: the final save did not finish)"
        if weights is not None
        else f"there is no final {ADAPTER_DIR}/ or {MODEL_DIR}/"
    )
    newest = next(
        (c for c in checkpoints.candidates(run_dir / CHECKPOINTS_DIR) if (c / checkpoints.MANIFEST).is_file()), None
    )
    if newest is None:
        use = "It committed no checkpoint yet, so nothing can be used"
    else:
        use = (
            f"Or use its newest committed checkpoint, {newest.name} (step {checkpoints.step_of(newest)}), directly: "
            f"python -m finetune.generate {newest} prompt=... / python -m finetune.merge {newest} out=DIR"
        )
    raise IntegrityError(
        f"{run_dir}: the run did not finish (run.json status: {status}: {how}); {what}. "
        "To finish it, run the same training command with resume=true. " + use
    )


def _is_checkpoint(path: Path) -> bool:
    run_dir = path.parent.parent
    return (
        path.parent.name == CHECKPOINTS_DIR
        and path.name.startswith("checkpoint-")
        and (run_dir / "run.json").is_file()
        and (run_dir / "config.yaml").is_file()
    )


def _checkpoint(path: Path) -> Target:
    """RUN/checkpoints/checkpoint-N: the weights of a training checkpoint, with the run's config and template, and
    the base recorded in run.json (base_model.json is only written with the final weights)."""
    from finetune.runs import checkpoints

    if not (path / checkpoints.MANIFEST).is_file():
        raise IntegrityError(
            f"{path}: no {checkpoints.MANIFEST}: this checkpoint was never committed (a save that did "
            "not finish); use an older checkpoint-N, or resume the run with resume=true"
        )
    run_dir = path.parent.parent
    config = _config(run_dir) or {}
    record = read_json(run_dir / "run.json")
    model, strategy = config.get("model") or {}, config.get("strategy") or {}
    weights = record.get("base_model_fingerprint")
    base = {
        "name_or_path": record.get("base_model") or model.get("name_or_path"),
        "revision": record.get("revision"),
        "family": model.get("family"),
        "training_dtype": model.get("dtype"),
        "weights_fingerprint": weights if weights and not str(weights).startswith("unavailable:") else None,
        "quantization": dict(strategy.get("quantization") or {}) if strategy.get("name") == "qlora" else None,
    }
    kind = (
        "adapter" if (path / "adapter_config.json").is_file() else "model" if (path / "config.json").is_file() else None
    )
    if kind is None:
        raise ConfigError(f"{path}: a checkpoint without adapter_config.json or config.json: no weights to use here")
    return Target(kind, path, run_dir, config, base)


def _refuse_invalid(folder: Path) -> None:
    invalid = folder.with_name(folder.name + INVALID_SUFFIX)
    if not folder.exists() and invalid.exists():
        raise ConfigError(
            f"{folder}: the last merge failed its numerical check and was left in {invalid} (see its "
            "merge_report.json); merge again"
        )


def _config(run_dir: Path | None) -> dict | None:
    path = run_dir / "config.yaml" if run_dir else None
    return yaml.safe_load(path.read_text(encoding="utf-8")) if path and path.is_file() else None


def _base_record(folder: Path) -> dict | None:
    return read_json(folder / BASE_RECORD) or None


def read_json(path: Path) -> dict:
    """A JSON record a run writes (run.json, base_model.json, merge_report.json); {} while it does not exist yet."""
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def base_source(target: Target, override: str | None) -> str:
    """Where the base weights are: `base=` when given, else the run's model.name_or_path, else the recorded Hub id."""
    if override:
        return str(Path(override).expanduser()) if Path(override).expanduser().exists() else override
    if target.config and target.config.get("model", {}).get("name_or_path"):
        return target.config["model"]["name_or_path"]
    if target.base and target.base.get("hub_id"):
        return target.base["hub_id"]
    raise ConfigError(f"{target.weights}: the base model is not recorded here; name it with base=PATH_OR_HUB_ID")
