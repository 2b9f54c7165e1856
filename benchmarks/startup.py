"""Start-up time of the CLI entry points vs importing torch and trl, measured in the same run.

    python benchmarks/startup.py                 # 5 timed runs of each command, after one warm-up
    python benchmarks/startup.py --runs 9

Each command runs in a fresh `python` process (this interpreter), output discarded; the wall time from spawn to exit
is taken, one untimed warm-up run first (page cache, .pyc files), then the median of `--runs`. A last run under
`python -X importtime` says which heavy libraries the command imported (torch, transformers, trl, hydra) and its
slowest top-level import. Baselines: `python -c "import torch"` and `python -c "from trl import SFTTrainer"` (what
any training script pays before it does anything).
Targets: `python -m finetune --help` < 0.5 s, `python -m finetune conf=lora_neox20b --cfg job` < 2 s.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "trl", "peft", "hydra")
COMMANDS = [  # (label, argv after the interpreter, target seconds or None)
    ("python -m finetune --help", ["-m", "finetune", "--help"], 0.5),
    ("python -m finetune conf=lora_neox20b --cfg job", ["-m", "finetune", "conf=lora_neox20b", "--cfg", "job"], 2.0),
    (
        "python -m finetune.plan conf=lora_neox20b gpu=h100-80gb",
        ["-m", "finetune.plan", "conf=lora_neox20b", "gpu=h100-80gb"],
        None,
    ),
    ('python -c "import torch"  (baseline)', ["-c", "import torch"], None),
    ('python -c "from trl import SFTTrainer"  (baseline)', ["-c", "from trl import SFTTrainer"], None),
]


def timed(argv: list[str], env: dict) -> float:
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, *argv],
        cwd=PROJECT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        check=False,
    )
    seconds = time.perf_counter() - started
    if result.returncode:
        sys.exit(f"{' '.join(argv)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return seconds


def imports(argv: list[str], env: dict) -> tuple[list[str], str]:
    """The heavy top-level packages imported, and the slowest top-level import (cumulative microseconds)."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", *argv],
        cwd=PROJECT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        check=False,
    )
    top, seen = {}, set()
    for line in result.stderr.splitlines():
        match = re.match(r"import time:\s+(\d+)\s+\|\s+(\d+)\s+\|( *)(\S+)$", line)
        if not match:
            continue
        cumulative, indent, name = int(match.group(2)), len(match.group(3)), match.group(4)
        seen.add(name.split(".")[0])
        if indent == 1:  # imported by the command itself, not by another module
            top[name] = max(top.get(name, 0), cumulative)
    heavy = [h for h in HEAVY if h in seen]
    slowest = max(top.items(), key=lambda kv: kv[1]) if top else ("-", 0)
    return heavy, f"{slowest[0]} {slowest[1] / 1e6:.2f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="timed runs per command (median reported)")
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(PROJECT), "TOKENIZERS_PARALLELISM": "false"}
    rows = []
    for label, argv, target in COMMANDS:
        timed(argv, env)  # warm-up, not counted
        times = [timed(argv, env) for _ in range(args.runs)]
        heavy, slowest = imports(argv, env)
        rows.append((label, statistics.median(times), min(times), max(times), target, heavy, slowest))
        print(f"{label}: median {statistics.median(times):.2f} s", file=sys.stderr, flush=True)
    torch_s = rows[3][1]
    print()
    print(
        f"| command (median of {args.runs} fresh processes) | median | min-max | target | result | heavy imports | "
        "slowest top-level import |"
    )
    print("|---|---|---|---|---|---|---|")
    for label, median, low, high, target, heavy, slowest in rows:
        verdict = "-" if target is None else ("pass" if median < target else "**FAIL**")
        print(
            f"| `{label}` | {median:.2f} s | {low:.2f}-{high:.2f} s | {f'< {target:g} s' if target else '-'} | "
            f"{verdict} | "
            f"{', '.join(heavy) or 'none'} | {slowest} |"
        )
    print(
        f"\nratio to `import torch` ({torch_s:.2f} s): "
        + ", ".join(
            f"{label.split('  ')[0].removeprefix('python ')} {median / torch_s:.2f}x" for label, median, *_ in rows[:3]
        )
    )
    failed = [label for label, median, _, _, target, *_ in rows if target is not None and median >= target]
    if failed:
        print(f"missed: {', '.join(failed)}; see `python -X importtime` of those commands")
        sys.exit(1)


if __name__ == "__main__":
    main()
