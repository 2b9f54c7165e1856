"""Experiment tracking: where `trainer.report_to` sends the curves, decided once per run, inside the run directory.

transformers' integrations take their settings from environment variables, not from TrainingArguments: TensorBoard
reads TENSORBOARD_LOGGING_DIR when the Trainer is built (transformers 5 dropped `logging_dir`; unset, the events would
land in <output_dir>/runs/<date_host>, i.e. among our checkpoints, and an evaluation before training would open a
`runs/` folder in the working directory), W&B and MLflow read WANDB_* / MLFLOW_* when the first metric is logged.
`session()` sets them for one run and puts the old values back afterwards, so runs sharing a process (a sweep, a
notebook, the tests) never inherit each other's folders; it also closes the W&B / MLflow run that transformers leaves
open, after the final evaluation has been logged to it. Credentials are only looked for, never read out or written.
metrics.json and loss.png (finetune.artifacts) are written whatever is chosen here.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

BACKENDS = ("tensorboard", "wandb", "mlflow")
# pip names (mlflow-skinny also does: no UI)
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
DEFAULT_PROJECT = "neo-finetune"
TENSORBOARD_DIR, WANDB_DIR, MLFLOW_DIR = "tensorboard", "wandb", "mlruns"  # inside the run directory
VARIABLES = (
    "TENSORBOARD_LOGGING_DIR",
    "WANDB_PROJECT",
    "WANDB_DIR",
    "WANDB_MODE",
    "WANDB_RUN_ID",
    "WANDB_RESUME",
    "MLFLOW_EXPERIMENT_NAME",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_ALLOW_FILE_STORE",
    "MLFLOW_RUN_ID",
)
RUN_IDS = (
    "tracking.json"  # in the run directory: the W&B / MLflow run ids, so that a resumed run continues the same runs
)


def backends(report_to) -> list[str]:
    """trainer.report_to as a list of backends; none (or null) is the empty list."""
    if report_to is None:
        return []
    items = [report_to] if isinstance(report_to, str) else list(report_to)
    return [name for name in items if name != "none"]


def trainer_arguments(cfg, run_dir: Path) -> dict:
    """The SFTConfig keys tracking owns: the backends, and the run's name in W&B / MLflow."""
    chosen = backends(cfg.trainer.get("report_to"))
    return {"report_to": chosen or "none", "run_name": cfg.tracking.run_name or default_run_name(run_dir)}


def default_run_name(run_dir: Path) -> str:
    """The run directory's name; a sweep's job folders are numbered (0, 1, ...), so theirs is SWEEP-N."""
    return f"{run_dir.parent.name}-{run_dir.name}" if run_dir.name.isdigit() else run_dir.name


def offline(setting, backend: str) -> bool:
    """tracking.offline for one backend: auto means offline unless that backend's credentials are present."""
    if setting != "auto":
        return bool(setting)
    if backend == "wandb":
        host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"
        return not (os.environ.get("WANDB_API_KEY") or _netrc_login(host))
    return not os.environ.get("MLFLOW_TRACKING_URI")


def _netrc_login(host: str) -> bool:
    """Whether a netrc file (NETRC or ~/.netrc, where `wandb login` writes) has an entry for host."""
    import netrc

    try:
        return netrc.netrc(os.environ.get("NETRC") or None).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def run_ids(run_dir: Path, chosen: list[str], resuming: bool) -> dict[str, str]:
    """The W&B / MLflow run ids this run logs to: a resumed run's from its tracking.json (the curves go on in the same
    runs), a fresh W&B id otherwise (MLflow makes its own at the first log; session() records it)."""
    import uuid

    saved = {}
    if resuming and (run_dir / RUN_IDS).is_file():
        saved = json.loads((run_dir / RUN_IDS).read_text(encoding="utf-8"))
    ids = {}
    if "wandb" in chosen:
        ids["wandb"] = saved.get("wandb") or uuid.uuid4().hex[:12]
    if "mlflow" in chosen and saved.get("mlflow"):
        ids["mlflow"] = saved["mlflow"]
    return ids


def environment(
    cfg, run_dir: Path, preset: str | None, ids: dict[str, str] | None = None
) -> tuple[dict[str, str], list[str]]:
    """The environment variables the selected integrations read, and one line per backend saying where it logs.
    `ids` (run_ids): the W&B / MLflow runs to log to; a WANDB_RUN_ID / MLFLOW_RUN_ID set by the user wins."""
    ids = ids or {}
    chosen = backends(cfg.trainer.get("report_to"))
    project = cfg.tracking.project or preset or DEFAULT_PROJECT
    run_name = cfg.tracking.run_name or default_run_name(run_dir)
    env, lines = {}, []
    if not chosen:
        lines.append("tracking: off (trainer.report_to=none); metrics.json and loss.png as always")
    if "tensorboard" in chosen:
        folder = run_dir / TENSORBOARD_DIR
        env["TENSORBOARD_LOGGING_DIR"] = str(folder.resolve())  # every run, a resumed one too, logs to the same folder
        lines.append(f"tracking: tensorboard -> {folder} (tensorboard --logdir {folder})")
    if "wandb" in chosen:
        env.update(WANDB_PROJECT=project, WANDB_DIR=str(run_dir.resolve()))  # wandb adds wandb/ itself
        if cfg.tracking.offline == "auto" and os.environ.get("WANDB_MODE"):
            mode = os.environ["WANDB_MODE"]  # chosen in the environment (offline, online, disabled): kept
        else:
            mode = "offline" if offline(cfg.tracking.offline, "wandb") else "online"
            env["WANDB_MODE"] = mode
        if ids.get("wandb") and not os.environ.get("WANDB_RUN_ID"):
            env.update(WANDB_RUN_ID=ids["wandb"], WANDB_RESUME="allow")  # a resumed run appends to the same W&B run
        folder = run_dir / WANDB_DIR
        where = (
            f"{folder} (wandb sync {folder}/offline-run-*)"
            if mode == "offline"
            else f"project {project} (local files in {folder})"
        )
        lines.append(
            f"tracking: wandb {mode} -> {where}, run {run_name} (id {env.get('WANDB_RUN_ID', 'from WANDB_RUN_ID')})"
        )
    if "mlflow" in chosen:
        env["MLFLOW_EXPERIMENT_NAME"] = project
        if ids.get("mlflow") and not os.environ.get("MLFLOW_RUN_ID"):
            env["MLFLOW_RUN_ID"] = ids["mlflow"]  # transformers' MLflowCallback resumes that run
        if offline(cfg.tracking.offline, "mlflow"):
            folder = run_dir / MLFLOW_DIR
            # a plain folder: copy it, `mlflow ui` it
            env["MLFLOW_TRACKING_URI"] = (run_dir.resolve() / MLFLOW_DIR).as_uri()
            env["MLFLOW_ALLOW_FILE_STORE"] = (
                "true"  # MLflow >= 3.17 refuses file stores without it (a database is preferred)
            )
            lines.append(
                f"tracking: mlflow offline -> {folder}, experiment {project}, run {run_name} "
                f"(mlflow ui --backend-store-uri {env['MLFLOW_TRACKING_URI']})"
            )
        else:  # the URI may hold a password: named, never printed
            lines.append(f"tracking: mlflow -> the server in MLFLOW_TRACKING_URI, experiment {project}, run {run_name}")
    return env, lines


@contextlib.contextmanager
def session(cfg, run_dir: Path, preset: str | None, resuming: bool = False) -> Iterator[None]:
    """Set the integrations' environment for one run; at the end, close what they left open, record the run ids
    (rank 0) and restore the environment."""
    from finetune import console as cli
    from finetune import ranks

    chosen = backends(cfg.trainer.get("report_to"))
    ids = run_ids(run_dir, chosen, resuming)
    env, lines = environment(cfg, run_dir, preset, ids)
    saved = {name: os.environ.get(name) for name in VARIABLES}
    os.environ.update(env)
    for line in lines:
        cli.say(line)
    completed, started_ms = False, int(time.time() * 1000)
    try:
        yield
        completed = True
    finally:
        try:
            mlflow_id = _close(chosen, completed, started_ms)
            if mlflow_id:
                ids["mlflow"] = mlflow_id
            if ids and ranks.is_main() and run_dir.is_dir():
                (run_dir / RUN_IDS).write_text(json.dumps(ids, indent=2) + "\n", encoding="utf-8")
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def _close(chosen: list[str], completed: bool, started_ms: int) -> str | None:
    """transformers never finishes a W&B run, and ends the MLflow run at train end (KeepMlflowRunOpen reopens it for
    the final evaluation): finish both here, or the next run in this process would log into them. A library that was
    never imported (the run stopped before its first log) has no run to finish. Returns the id of the MLflow run
    started since `started_ms` (epoch milliseconds), if any."""
    wandb, mlflow = sys.modules.get("wandb"), sys.modules.get("mlflow")
    if "wandb" in chosen and wandb is not None and wandb.run is not None:
        wandb.finish(exit_code=0 if completed else 1)
    if "mlflow" not in chosen or mlflow is None:
        return None
    if mlflow.active_run() is not None:
        mlflow.end_run("FINISHED" if completed else "FAILED")
    last = mlflow.last_active_run()  # this run's, unless it never logged (then an older one of this process, or none)
    return last.info.run_id if last is not None and last.info.start_time >= started_ms else None


def callbacks(report_to) -> list:
    """Trainer callbacks the selected backends need besides transformers' own (built here: transformers is heavy to
    import, and validate.py imports this module)."""
    if "mlflow" not in backends(report_to):
        return []
    from transformers import TrainerCallback

    class KeepMlflowRunOpen(TrainerCallback):
        """MLflowCallback ends its run at train end, and the final evaluation would then start an unnamed second run:
        reopen the same run (transformers' callbacks run before ours); session() ends it after the evaluation."""

        def on_train_end(self, args, state, control, **kwargs):
            if not state.is_world_process_zero:  # the other ranks never started one
                return
            import mlflow

            last = mlflow.last_active_run()
            if mlflow.active_run() is None and last is not None:
                mlflow.start_run(run_id=last.info.run_id)

    return [KeepMlflowRunOpen()]
