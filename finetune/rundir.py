"""Find what a path given to merge / generate / push holds: a run directory, an adapter folder or a full model.

A run directory describes itself (train.py): `adapter/` (PEFT layout, with `base_model.json`, the base it was
trained on) or `model/` (full fine-tuning), `merged/` once merged, `config.yaml` (the resolved config) and
`data_template.yaml`. The tools also accept an adapter or model folder on its own (copied elsewhere, or
downloaded from the Hub); then the base comes from `base_model.json` or must be named with `base=`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from finetune.errors import ConfigError

ADAPTER_DIR, MODEL_DIR, MERGED_DIR = "adapter", "model", "merged"
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


def locate(path: str | Path, merged: bool = False) -> Target:
    """A run directory (its adapter, its full model, or with merged=True its merged model), or a weights folder."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise ConfigError(f"{path}: no such directory; give a run directory (output_dir of a run), an adapter folder "
                          "or a model folder")
    if (path / "run.json").is_file() or ((path / "config.yaml").is_file()
                                         and ((path / ADAPTER_DIR).is_dir() or (path / MODEL_DIR).is_dir())):
        return _in_run(path, merged)
    if merged:
        raise ConfigError(f"{path}: merged=true needs a run directory (with merged/ from python -m finetune.merge)")
    run_dir = path.parent if (path.parent / "config.yaml").is_file() and (path.parent / "run.json").is_file() else None
    if (path / "adapter_config.json").is_file():
        return Target("adapter", path, run_dir, _config(run_dir), _base_record(path))
    if (path / "config.json").is_file():
        _refuse_invalid(path)
        return Target("model", path, run_dir, _config(run_dir), _base_record(path))
    raise ConfigError(f"{path}: neither a run directory (run.json), an adapter (adapter_config.json) nor a model "
                      "(config.json)")


def _in_run(run_dir: Path, merged: bool) -> Target:
    config = _config(run_dir)
    if merged:
        folder = run_dir / MERGED_DIR
        _refuse_invalid(folder)
        if not (folder / "config.json").is_file():
            raise ConfigError(f"{run_dir}: no merged model in {folder}; run python -m finetune.merge {run_dir} first")
        return Target("model", folder, run_dir, config, _base_record(run_dir / ADAPTER_DIR))
    if (run_dir / ADAPTER_DIR / "adapter_config.json").is_file():
        return Target("adapter", run_dir / ADAPTER_DIR, run_dir, config, _base_record(run_dir / ADAPTER_DIR))
    if (run_dir / MODEL_DIR / "config.json").is_file():
        return Target("model", run_dir / MODEL_DIR, run_dir, config, _base_record(run_dir / MODEL_DIR))
    status = read_json(run_dir / "run.json").get("status")
    raise ConfigError(f"{run_dir}: no trained weights ({ADAPTER_DIR}/ or {MODEL_DIR}/); run status: {status}. "
                      "Finish (or resume) the run first")


def _refuse_invalid(folder: Path) -> None:
    invalid = folder.with_name(folder.name + INVALID_SUFFIX)
    if not folder.exists() and invalid.exists():
        raise ConfigError(f"{folder}: the last merge failed its numerical check and was left in {invalid} (see its "
                          "merge_report.json); merge again")


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
