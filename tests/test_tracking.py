"""Experiment tracking: TensorBoard by default inside the run directory, W&B / MLflow offline there too, each refused
before any model loads when misnamed or not installed (finetune.tracking, validate.check_report_to)."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

from finetune.config.compose import compose
from finetune.config.validate import validate
from finetune.errors import ConfigError
from finetune.train import tracking
from finetune.train.run import run

from helpers import tiny_overrides

INSTALLED = [name for name in ("wandb", "mlflow") if importlib.util.find_spec(name) is not None]
# 4 steps of one row, a loss logged every 2, 9 held-out rows evaluated once after training (and before, by default)
SHORT = (
    "trainer.max_steps=4",
    "trainer.logging_steps=2",
    "trainer.per_device_train_batch_size=1",
    "data.eval_fraction=0.03",
    "trainer.eval_strategy=no",
    "trainer.per_device_eval_batch_size=16",
    "sample_generations=0",
)


def tiny_run(tiny_models, run_dir: Path, *extra: str) -> Path:
    return run(compose("demo", tiny_overrides("neox", tiny_models["neox"], run_dir, *SHORT, *extra)))


def train_losses(run_dir: Path) -> list[float]:
    return [h["loss"] for h in json.loads((run_dir / "metrics.json").read_text())["history"] if "loss" in h]


def problems_of(overrides: list[str]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        validate(compose("demo", overrides))
    return caught.value.problems


@pytest.fixture
def clean_environment(monkeypatch, tmp_path):
    """No credentials or tracking settings from the machine running the tests; W&B's own caches in tmp_path."""
    for name in (*tracking.VARIABLES, "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "netrc").write_text("")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb_data"))


def test_tensorboard_is_the_default_and_logs_inside_the_run_directory(tiny_models, tmp_path, clean_environment):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # transformers' and torch's own default: runs/<Mon DD_HH-MM-SS_host> in the working directory
    def stray() -> set[Path]:
        return set(Path("runs").glob("*_??-??-??_*"))

    before = stray()
    run_dir = tiny_run(tiny_models, tmp_path / "run")
    assert "TENSORBOARD_LOGGING_DIR" not in os.environ  # set for the run only
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert not (run_dir / "checkpoints" / "runs").exists() and stray() == before
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    losses = [s.value for s in events.Scalars("train/loss")]
    assert [s.step for s in events.Scalars("train/loss")] == [2, 4]
    assert losses == pytest.approx(train_losses(run_dir))  # the same curve as metrics.json and loss.png
    eval_steps = {s.step for s in events.Scalars("eval/loss")}
    assert {0, 4} <= eval_steps  # the untouched base (eval_before_training) and the trained adapter
    assert (run_dir / "loss.png").exists()


def test_report_to_is_checked_before_any_model_loads(monkeypatch):
    text = "\n".join(problems_of(["trainer.report_to=[tensorboard,comet_ml]"]))
    assert "trainer.report_to: 'comet_ml' is not one of none, tensorboard, wandb, mlflow" in text
    text = "\n".join(problems_of(["trainer.report_to=all"]))
    assert "trainer.report_to: 'all' turns on every tracker that happens to be installed" in text
    assert "trainer.run_name: set through tracking.run_name=NAME instead" in problems_of(["trainer.run_name=x"])
    assert "tracking.offline: 'sometimes' is not one of true, false, auto" in problems_of(
        ["tracking.offline=sometimes"]
    )

    real_find_spec = importlib.util.find_spec  # as if neither were installed, whatever this machine has

    def find_spec(name, *args, **kwargs):
        return None if name in ("wandb", "mlflow") else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    problems = problems_of(["trainer.report_to=[tensorboard,wandb,mlflow]"])
    assert problems == [
        'trainer.report_to: wandb is selected but not installed; pip install wandb (or pip install -e ".[tracking]")',
        'trainer.report_to: mlflow is selected but not installed; pip install mlflow (or pip install -e ".[tracking]")',
    ]
    validate(compose("demo", ["trainer.report_to=none"]))
    validate(compose("demo", ["trainer.report_to=tensorboard"]))


def test_offline_auto_follows_credentials_and_never_shows_them(tmp_path, clean_environment, monkeypatch):
    cfg = compose("demo", [f"output_dir={tmp_path / 'run'}", "trainer.report_to=[wandb,mlflow]"])
    run_dir = tmp_path / "run"
    env, lines = tracking.environment(cfg, run_dir, "demo")
    assert (
        env["WANDB_MODE"] == "offline" and env["WANDB_DIR"] == str(run_dir.resolve()) and env["WANDB_PROJECT"] == "demo"
    )
    assert (
        env["MLFLOW_TRACKING_URI"] == (run_dir.resolve() / "mlruns").as_uri()
        and env["MLFLOW_EXPERIMENT_NAME"] == "demo"
    )
    assert any(f"wandb sync {run_dir / 'wandb'}/offline-run-*" in line for line in lines)

    monkeypatch.setenv("WANDB_API_KEY", "secret-key-0123456789")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://user:secret-password@mlflow.example.com")
    env, lines = tracking.environment(cfg, run_dir, "demo")
    assert env["WANDB_MODE"] == "online" and "MLFLOW_TRACKING_URI" not in env  # the server given stays
    shown = "\n".join([*lines, *env.values()])
    assert "secret" not in shown

    monkeypatch.delenv("WANDB_API_KEY")
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password secret-key-0123456789\n")
    assert tracking.environment(cfg, run_dir, "demo")[0]["WANDB_MODE"] == "online"  # `wandb login` wrote a netrc entry
    forced = compose(
        "demo",
        [f"output_dir={run_dir}", "trainer.report_to=[wandb,mlflow]", "tracking.offline=true", "tracking.project=p"],
    )
    env, _ = tracking.environment(forced, run_dir, "demo")
    assert (
        env["WANDB_MODE"] == "offline"
        and env["MLFLOW_TRACKING_URI"].startswith("file://")
        and env["WANDB_PROJECT"] == "p"
    )

    monkeypatch.setenv("WANDB_PROJECT", "from-before")
    with tracking.session(forced, run_dir, "demo"):
        assert os.environ["WANDB_PROJECT"] == "p" and os.environ["WANDB_MODE"] == "offline"
    assert os.environ["WANDB_PROJECT"] == "from-before" and "WANDB_MODE" not in os.environ  # put back for the next run


@pytest.mark.skipif(not INSTALLED, reason='neither wandb nor mlflow is installed (pip install -e ".[tracking]")')
def test_wandb_and_mlflow_offline_runs_land_in_the_run_directory(tiny_models, tmp_path, clean_environment):
    """One run for both (whichever is installed): each backend costs a run's worth of CI time otherwise."""
    run_dir = tiny_run(
        tiny_models,
        tmp_path / "run",
        f"trainer.report_to=[{','.join(INSTALLED)}]",
        "tracking.offline=true",
        "tracking.run_name=tiny-offline",
        "eval_before_training=false",
    )
    assert not (run_dir / "tensorboard").exists() and not set(tracking.VARIABLES) & set(os.environ)
    if "wandb" in INSTALLED:
        import wandb

        assert wandb.run is None  # finished, so a next run in this process starts its own
        (offline,) = (run_dir / "wandb").glob("offline-run-*")
        ids = json.loads((run_dir / tracking.RUN_IDS).read_text())
        assert offline.name.endswith(f"-{ids['wandb']}")  # the id a resumed run will continue
        (records,) = offline.glob("run-*.wandb")
        data = records.read_bytes()
        assert b"train/loss" in data and b"eval/loss" in data and b"tiny-offline" in data
    if "mlflow" in INSTALLED:
        import mlflow

        assert mlflow.active_run() is None
        (run,) = [p.parent for p in (run_dir / "mlruns").glob("*/*/meta.yaml")]  # one run: the final eval reopened it
        assert run.name == json.loads((run_dir / tracking.RUN_IDS).read_text())["mlflow"]
        meta = (run / "meta.yaml").read_text()
        assert "run_name: tiny-offline" in meta and "status: 3" in meta  # FINISHED
        losses = [float(line.split()[1]) for line in (run / "metrics" / "loss").read_text().splitlines()]
        assert losses == pytest.approx(train_losses(run_dir))
        assert (run / "metrics" / "eval_loss").read_text().strip()


def test_a_resumed_run_continues_its_wandb_and_mlflow_runs(tmp_path, clean_environment, monkeypatch):
    cfg = compose("demo", [f"output_dir={tmp_path}", "trainer.report_to=[wandb,mlflow]", "tracking.offline=true"])
    fresh = tracking.run_ids(tmp_path, ["wandb", "mlflow"], resuming=False)
    assert len(fresh["wandb"]) == 12 and "mlflow" not in fresh  # MLflow names its run at the first log
    # a fresh run (overwrite=true) starts new runs
    assert tracking.run_ids(tmp_path, ["wandb"], resuming=False) != fresh

    (tmp_path / tracking.RUN_IDS).write_text(json.dumps({"wandb": "abc123def456", "mlflow": "0f1e2d"}))
    ids = tracking.run_ids(tmp_path, ["wandb", "mlflow"], resuming=True)
    assert ids == {"wandb": "abc123def456", "mlflow": "0f1e2d"}
    env, lines = tracking.environment(cfg, tmp_path, "demo", ids)
    assert env["WANDB_RUN_ID"] == "abc123def456" and env["WANDB_RESUME"] == "allow" and env["MLFLOW_RUN_ID"] == "0f1e2d"
    assert any("id abc123def456" in line for line in lines)
    assert tracking.run_ids(tmp_path, ["wandb", "mlflow"], resuming=False)["wandb"] != "abc123def456"

    monkeypatch.setenv("WANDB_RUN_ID", "chosen-by-user")  # the user's own ids win
    monkeypatch.setenv("MLFLOW_RUN_ID", "user-run")
    env, _ = tracking.environment(cfg, tmp_path, "demo", ids)
    assert "WANDB_RUN_ID" not in env and "MLFLOW_RUN_ID" not in env
