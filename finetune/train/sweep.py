"""Hydra multirun sweeps: one run directory per job, a failed job that does not stop the sweep, and a summary table.

`python -m finetune conf=demo -m strategy.r=8,16,32 trainer.learning_rate=1e-4,3e-4` runs every combination with
Hydra's own sweeper (or the Optuna sweeper plugin, `hydra/sweeper=optuna`, where it is installed: each job returns
its held-out loss as the objective). Each job trains in `<sweep dir>/<job number>/`, a complete run directory.
After every job `sweep_summary.md` and `sweep_summary.json` in the sweep directory are rewritten from the jobs'
run.json files, so an interrupted sweep still has its table; `python -m finetune.sweep SWEEP_DIR` prints it again.

This module is imported by Hydra at start-up (conf/config.yaml `hydra.callbacks`): keep it free of heavy imports.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from hydra.experimental.callback import Callback

SUMMARY = "sweep_summary"
# Overrides that say where things are, not what was tried: left out of the table's columns.
_PLACE_KEYS = ("output_dir", "overwrite", "hydra.")


class SweepSummary(Callback):
    """Hydra callback: rewrite the sweep's summary after each job and print it once the sweep ends."""

    def on_job_end(self, config, job_return, **kwargs) -> None:
        from hydra.types import RunMode

        if config.hydra.mode == RunMode.MULTIRUN:
            write(Path(config.hydra.sweep.dir))

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = write(sweep_dir)
        print(
            f"[finetune] sweep of {len(rows)} runs: {sweep_dir / (SUMMARY + '.md')}\n{table(rows)}",
            file=sys.stderr,
            flush=True,
        )


def collect(sweep_dir: Path) -> list[dict]:
    """One row per job directory (a folder holding run.json), best held-out loss first, failures last."""
    rows = []
    for record_path in sorted(sweep_dir.glob("*/run.json"), key=lambda p: _job_order(p.parent.name)):
        record = json.loads(record_path.read_text(encoding="utf-8"))
        rows.append(
            {
                "job": record_path.parent.name,
                "overrides": _settings(record.get("overrides", [])),
                "status": record.get("status"),
                "exit_code": record.get("exit_code"),
                "global_steps": record.get("global_steps"),
                "train_loss": record.get("train_loss"),
                "eval_loss_before": record.get("eval_loss_before"),
                "eval_loss_after": record.get("eval_loss_after"),
                "best_eval_loss": record.get("best_eval_loss"),
                "train_seconds": record.get("train_seconds"),
                "error": (record.get("error") or "")[:300] or None,
            }
        )
    rows.sort(key=lambda r: (r["status"] != "completed", _number(objective(r))))
    return rows


def objective(row: dict) -> float:
    """What a sweep minimises: the held-out loss after training (the best one under early stopping), else the
    training loss; NaN for a run that did not complete (Optuna records such a trial as failed)."""
    if row.get("status") != "completed":
        return math.nan
    for key in ("best_eval_loss", "eval_loss_after", "train_loss"):
        if row.get(key) is not None:
            return float(row[key])
    return math.nan


def write(sweep_dir: Path) -> list[dict]:
    rows = collect(sweep_dir)
    if rows:
        (sweep_dir / f"{SUMMARY}.json").write_text(json.dumps({"runs": rows}, indent=2) + "\n", encoding="utf-8")
        (sweep_dir / f"{SUMMARY}.md").write_text(f"# Sweep {sweep_dir.name}\n\n{table(rows)}\n", encoding="utf-8")
    return rows


def table(rows: list[dict]) -> str:
    """A Markdown table: the settings that differ between jobs, then the outcome of each."""
    varying = [
        k
        for k in dict.fromkeys(k for r in rows for k in r["overrides"])
        if len({r["overrides"].get(k) for r in rows}) > 1 or len(rows) == 1
    ]
    head = ["job", *varying, "status", "steps", "train loss", "eval loss before", "eval loss after", "train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [
            row["job"],
            *(row["overrides"].get(k, "") for k in varying),
            row["status"] or "?",
            _cell(row["global_steps"]),
            _cell(row["train_loss"]),
            _cell(row["eval_loss_before"]),
            _cell(row["best_eval_loss"] if row["best_eval_loss"] is not None else row["eval_loss_after"]),
            _cell(row["train_seconds"], ".0f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    best = next((r for r in rows if r["status"] == "completed" and not math.isnan(objective(r))), None)
    if best is not None:
        lines.append(
            f"\nbest: job {best['job']} "
            f"({', '.join(f'{k}={v}' for k, v in best['overrides'].items() if k in varying) or 'the only run'}), "
            f"loss {objective(best):.4f}, run directory {best['job']}/"
        )
    failed = [r for r in rows if r["status"] != "completed"]
    for row in failed:
        lines.append(
            f"job {row['job']}: {row['status']} (exit {row['exit_code']}): "
            f"{(row['error'] or 'see its train.log').replace(chr(10), ' ')}"
        )
    return "\n".join(lines)


def _settings(overrides: list[str]) -> dict[str, str]:
    pairs = (o.lstrip("+~").split("=", 1) for o in overrides if "=" in o)
    return {k: v for k, v in pairs if not k.startswith(_PLACE_KEYS)}


def _cell(value, spec: str = ".4f") -> str:
    if value is None:
        return ""
    return format(value, spec) if isinstance(value, float) else str(value)


def _number(value: float) -> float:
    return math.inf if math.isnan(value) else value


def _job_order(name: str) -> tuple[int, str]:
    return (int(name), name) if name.isdigit() else (sys.maxsize, name)


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or any(a in ("-h", "--help") for a in args):
        print(
            "usage: python -m finetune.sweep SWEEP_DIR\n\nRewrite and print the summary table of a sweep "
            "(python -m finetune ... -m key=a,b): one row per job directory, best held-out loss first."
        )
        return
    sweep_dir = Path(args[0])
    rows = write(sweep_dir)
    if not rows:
        print(
            f"error: no job directories with run.json in {sweep_dir} (a sweep directory holds 0/, 1/, ...)",
            file=sys.stderr,
        )
        sys.exit(2)
    print(table(rows))


if __name__ == "__main__":
    main()
