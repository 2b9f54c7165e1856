"""Hydra multirun sweeps (finetune/sweep.py): a run directory per job, a refused job that does not stop the others,
the summary table, and sweep keys checked before any job starts."""

from __future__ import annotations

import json
import math

from finetune.train import sweep

from helpers import run_cli, tiny_overrides


def test_sweep_runs_each_job_in_its_own_directory_and_summarises(tiny_models, tmp_path):
    sweep_dir = tmp_path / "sweep"
    overrides = tiny_overrides("neo", tiny_models["neo"], sweep_dir, "trainer.max_steps=2", "sample_generations=0")
    # the second job's r=0 is refused when it starts; the sweep goes on
    out = run_cli("-m", "strategy.r=2,0", *overrides)

    assert out.returncode == 2, out.stderr[-3000:]  # the worst job's exit code
    completed = json.loads((sweep_dir / "0" / "run.json").read_text())
    assert completed["status"] == "completed" and "strategy.r=2" in completed["overrides"]
    assert (sweep_dir / "0" / "adapter" / "adapter_model.safetensors").is_file()
    refused = json.loads((sweep_dir / "1" / "run.json").read_text())
    assert refused["status"] == "failed:config" and "strategy.r" in refused["error"]

    rows = json.loads((sweep_dir / "sweep_summary.json").read_text())["runs"]
    assert [(r["job"], r["status"], r["overrides"]["strategy.r"]) for r in rows] == [
        ("0", "completed", "2"),
        ("1", "failed:config", "0"),
    ]
    assert rows[0]["eval_loss_after"] == completed["eval_loss_after"]
    table = (sweep_dir / "sweep_summary.md").read_text()
    assert "| job | strategy.r | status |" in table and "best: job 0 (strategy.r=2)" in table
    assert "sweep of 2 runs" in out.stderr


def test_sweep_with_a_misspelled_key_stops_before_any_job(tmp_path):
    out = run_cli("-m", "strategy.rr=8,16", f"output_dir={tmp_path / 'sweep'}")
    assert out.returncode == 2
    assert "the sweep's first job" in out.stderr and "strategy.rr" in out.stderr and "did you mean 'r'" in out.stderr
    assert not (tmp_path / "sweep").exists()


def test_objective_prefers_the_best_eval_loss_and_is_nan_for_failed_jobs():
    assert (
        sweep.objective({"status": "completed", "best_eval_loss": 1.5, "eval_loss_after": 2.0, "train_loss": 3.0})
        == 1.5
    )
    assert sweep.objective({"status": "completed", "eval_loss_after": 2.0, "train_loss": 3.0}) == 2.0
    assert sweep.objective({"status": "completed", "train_loss": 3.0}) == 3.0
    assert math.isnan(sweep.objective({"status": "failed:config"}))


def test_sweep_jobs_get_a_tracking_run_name_that_names_the_sweep():
    from pathlib import Path

    from finetune.train.tracking import default_run_name

    assert default_run_name(Path("runs/sweeps/demo/2026-11-22_00-10-00/3")) == "2026-11-22_00-10-00-3"
    assert default_run_name(Path("runs/legal")) == "legal"
