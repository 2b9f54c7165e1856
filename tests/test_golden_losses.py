"""Golden loss trajectories: numbers that cannot drift silently (issue 21 item 4).

The project reaches into trl, transformers and peft in several places (the guarded SFT trainer, the compact LM head,
GPT-Neo's SDPA attention, LoRA+/DoRA wiring, loss normalisation over gradient accumulation). A library upgrade that
changes what training computes must fail here, naming the family, the strategy and the first step that differs,
not pass unnoticed because the loss still "goes down".

One Hydra multirun (a single `python -m finetune -m` process, 9 jobs) trains every tiny family (GPT-Neo, GPT-NeoX,
GPT-J) with every strategy (LoRA, DoRA, full) for 5 optimizer steps, fp32 on CPU, and each (family, strategy) is a
test of its own (`test_loss_trajectory[neox-dora]`) comparing the 5 logged losses with tests/golden/losses.json.
Only the command-line forms are used (`python -m finetune.tiny`, `python -m finetune`), never a finetune module.

Regenerate the golden file after an intended change (a deliberate upgrade, a changed default), then review its diff:
    NEO_FINETUNE_REGENERATE_GOLDEN=1 python -m pytest tests/test_golden_losses.py
Nothing here holds a number: the file is written only by running the real code.

Why the numbers agree across x86 machines, well within the tolerance (see PINNED_ENV and SWEEP for each setting):
- fp32 end to end: model.dtype=float32 and trainer.bf16=false given explicitly (the default `auto` picks bf16 on CPUs
  with avx512_bf16, such as this AMD EPYC, and fp32 on most Intel CI runners); CUDA hidden, so a GPU runner trains on
  its CPU too. The resolved config.yaml of every job is checked for it.
- bases built here from a fixed seed with no pretraining (pretrain_epochs=0: pretraining would amplify float
  differences and the demo's pretrained base changes independently), their tokenizer trained on the rows below,
  dropout checked to be 0 in every config.json (LoRA dropout 0 in every job's config);
- 40 fixed rows written by this file, all of them one epoch (5 steps x 4 x 2), shuffled by seed 42, no held-out
  split, no packing (data.packing=auto could flip), no eval, no sample generation, no checkpoints;
- one CPU thread and the AVX2 code paths of torch, MKL and oneDNN (ATEN_CPU_CAPABILITY, MKL_CBWR, ONEDNN_MAX_CPU_ISA),
  so reductions should run in the same order on an AVX512 AMD EPYC and an AVX2 or AVX512 Intel runner.
Measured on the 2-core AMD EPYC where the golden was made (no Intel CPU was at hand): letting torch use its AVX512
kernels, or 2 threads, moves the losses by at most 1.9e-7 relative; repeated runs with the pins are bit-identical.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).resolve().parent / "golden" / "losses.json"
REGENERATE_ENV = "NEO_FINETUNE_REGENERATE_GOLDEN"
REGENERATE = os.environ.get(REGENERATE_ENV) == "1"
REGENERATE_COMMAND = f"{REGENERATE_ENV}=1 python -m pytest tests/test_golden_losses.py"

# Tolerance, per step: relative 1e-5 of the golden loss (~6e-5 nats at these losses of ~5-6.3), with an absolute
# floor of 1e-6 so that a loss near 0 would not demand bit equality. Float noise between x86 machines measured 1.9e-7
# relative (above), 50x below it; what a library change does to training (a LoRA scale, the loss normalisation over
# gradient accumulation, an optimizer default, a mask) moves these losses by 1e-4 to 1e-1.
RTOL = 1e-5
ATOL = 1e-6
STEPS = 5

# test id -> (conf/model option, model.family, as conf/model/_family_*.yaml name it)
FAMILIES = {"neo": ("tiny_neo", "gpt_neo"), "neox": ("tiny_neox", "gpt_neox"), "gptj": ("tiny_gptj", "gptj")}
TINY_ARCH = {"neo": "neo", "neox": "neox", "gptj": "gptj"}  # test id -> python -m finetune.tiny --arch
FAMILY_NAMES = {"neo": "GPT-Neo", "neox": "GPT-NeoX", "gptj": "GPT-J"}
STRATEGY_NAMES = {"lora": "LoRA", "dora": "DoRA", "full": "full fine-tuning"}
STRATEGIES = ("lora", "dora", "full")
CASES = [(f, s) for f in FAMILIES for s in STRATEGIES]

PINNED_ENV = {
    "CUDA_VISIBLE_DEVICES": "",  # CPU even on a GPU runner: the golden is a CPU trajectory
    "OMP_NUM_THREADS": "1",  # the split of a reduction across threads changes its rounding
    "MKL_NUM_THREADS": "1",
    # torch's vectorised kernels (softmax, norms, fused AdamW) at the same width everywhere
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "AVX2",  # MKL's conditional numerical reproducibility: the same GEMM code path on Intel and AMD
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "PYTHONHASHSEED": "0",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
}

# python -m finetune.tiny: every size given, so a changed default of the builder cannot change the base unseen.
BUILD = ["--vocab-size", "1024", "--hidden-size", "128", "--layers", "4", "--seed", "0", "--pretrain-epochs", "0"]

# The sweep's settings; {models}, {data} and {out} are filled in with this run's temporary paths. Every value that
# decides the numbers is given here, not left to conf/demo.yaml or a library default that could change beside it.
SWEEP = [
    "conf=demo",
    "-m",
    f"model={','.join(m for m, _ in FAMILIES.values())}",
    f"strategy={','.join(STRATEGIES)}",
    "model.name_or_path={models}/${{model.family}}",  # each family's base, built below under its family's name
    "model.tiny=null",  # never build or pretrain a base: use the one built here
    "model.dtype=float32",
    "trainer.bf16=false",
    "trainer.fp16=false",
    "output_dir={out}",
    "data=alpaca",
    "data.path={data}",
    "data.eval_path=null",
    "data.eval_fraction=0",  # no held-out split: every row trains, nothing is evaluated
    "data.packing=false",
    "data.max_length=256",  # the longest row is 174 tokens
    "data.overlength=error",  # a row that no longer fits fails loudly instead of silently changing the batches
    "data.train_on_inputs=false",
    "seed=42",
    f"trainer.max_steps={STEPS}",
    "trainer.logging_steps=1",  # one logged loss per optimizer step
    "trainer.per_device_train_batch_size=4",
    "trainer.gradient_accumulation_steps=2",  # exercises the loss normalisation across micro-batches
    "trainer.learning_rate=1e-3",
    "trainer.lr_scheduler_type=cosine",
    "trainer.warmup_steps=0",
    "trainer.weight_decay=0.0",
    "trainer.max_grad_norm=1.0",
    "trainer.optim=adamw_torch_fused",
    "trainer.save_strategy=no",
    "trainer.eval_strategy=no",
    "trainer.report_to=none",
    "eval_before_training=false",
    "sample_generations=0",
]

# The training rows: 40 short Alpaca rows, fixed here so that no change to the bundled demo data moves the numbers.
PLACES = [
    ("France", "Paris", "Seine"),
    ("Italy", "Rome", "Tiber"),
    ("Egypt", "Cairo", "Nile"),
    ("England", "London", "Thames"),
    ("Hungary", "Budapest", "Danube"),
    ("Iraq", "Baghdad", "Tigris"),
    ("Germany", "Berlin", "Spree"),
    ("Russia", "Moscow", "Moskva"),
    ("Portugal", "Lisbon", "Tagus"),
    ("Ireland", "Dublin", "Liffey"),
]
WORDS = ["apple", "river", "stone", "light", "garden", "window", "silver", "thunder", "paper", "forest"]


def training_rows() -> list[dict]:
    rows = []
    for country, capital, river in PLACES:
        rows.append(
            {
                "instruction": f"What is the capital of {country}?",
                "input": "",
                "output": f"The capital of {country} is {capital}.",
            }
        )
        rows.append(
            {
                "instruction": "Which river flows through this city?",
                "input": capital,
                "output": f"The {river} flows through {capital}, the capital of {country}.",
            }
        )
    for a in range(2, 12):
        b = 3 * a + 1
        rows.append({"instruction": f"Add {a} and {b}.", "input": "", "output": f"{a} plus {b} is {a + b}."})
    for word in WORDS:
        rows.append(
            {"instruction": "Spell the word backwards.", "input": word, "output": f"{word} backwards is {word[::-1]}."}
        )
    return rows


def rows_jsonl() -> str:
    return "".join(json.dumps(row, sort_keys=True) + "\n" for row in training_rows())


def current_settings() -> dict:
    """Everything that decides the numbers apart from the code: compared with the golden file's
    (test_golden_settings)."""
    return {
        "env": PINNED_ENV,
        "build": BUILD,
        "sweep": SWEEP,
        "data_sha256": hashlib.sha256(rows_jsonl().encode()).hexdigest(),
    }


def library_versions() -> dict:
    versions = {"python": platform.python_version()}
    for package in ("torch", "transformers", "trl", "peft", "accelerate", "tokenizers", "hydra-core"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _env() -> dict:
    return {**os.environ, **PINNED_ENV}


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _build_bases(root: Path, data: Path) -> Path:
    """The three unpretrained tiny bases, built side by side (three short processes, one thread each)."""
    models = root / "models"
    started = []
    for test_id, (_, family) in FAMILIES.items():
        log = (root / f"build-{test_id}.log").open("w")
        command = [
            sys.executable,
            "-m",
            "finetune.tiny",
            "--arch",
            TINY_ARCH[test_id],
            "--out",
            str(models / family),
            "--corpus",
            str(data),
            *BUILD,
        ]
        started.append(
            (test_id, log, subprocess.Popen(command, cwd=PROJECT, env=_env(), stdout=log, stderr=subprocess.STDOUT))
        )
    failed = []
    for test_id, log, process in started:  # all three waited for before reporting, so none is left running
        try:
            code = process.wait(timeout=300)
        except subprocess.TimeoutExpired:
            process.kill()
            code = process.wait()
        finally:
            log.close()
        if code != 0:
            failed.append(
                f"python -m finetune.tiny --arch {TINY_ARCH[test_id]} failed (exit {code}):\n"
                f"{_tail((root / f'build-{test_id}.log').read_text())}"
            )
    if failed:
        pytest.fail("\n".join(failed))
    # the tiny configs must train without dropout (transformers' defaults)
    for test_id, (_, family) in FAMILIES.items():
        config = json.loads((models / family / "config.json").read_text())
        dropouts = {k: v for k, v in config.items() if ("drop" in k) and k != "classifier_dropout" and v}
        assert not dropouts, (
            f"tiny {test_id} base has dropout {dropouts}: the trajectory would depend on the RNG stream"
        )
    return models


def _collect(sweep_dir: Path) -> dict[tuple[str, str], dict]:
    """(test family id, strategy) -> what its job ran and logged, read from its run directory."""
    import yaml

    by_family = {family: test_id for test_id, (_, family) in FAMILIES.items()}
    results = {}
    for job in sorted((p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name)):
        record = json.loads((job / "run.json").read_text()) if (job / "run.json").exists() else {}
        config = yaml.safe_load((job / "config.yaml").read_text()) if (job / "config.yaml").exists() else None
        if config is None:
            continue
        key = (by_family.get(config["model"]["family"], config["model"]["family"]), config["strategy"]["name"])
        history = json.loads((job / "metrics.json").read_text())["history"] if (job / "metrics.json").exists() else []
        steps_log = job / "train_steps.jsonl"
        batches = {}
        if steps_log.exists():
            for line in steps_log.read_text().splitlines():
                entry = json.loads(line)
                batches[entry["step"]] = entry["batches"]
        results[key] = {
            "job": job,
            "status": record.get("status"),
            "error": record.get("error"),
            "config": config,
            "steps": [
                {"step": h["step"], "loss": h["loss"], "batches": batches.get(h["step"])}
                for h in history
                if "loss" in h
            ],
        }
    return results


@pytest.fixture(scope="module")
def trajectories(tmp_path_factory) -> dict:
    """Build the bases, run the 9-job sweep once, and (NEO_FINETUNE_REGENERATE_GOLDEN=1) rewrite the golden file."""
    root = tmp_path_factory.mktemp("golden")
    data = root / "rows.jsonl"
    data.write_text(rows_jsonl(), encoding="utf-8")
    models = _build_bases(root, data)
    sweep_dir = root / "sweep"
    args = [a.format(models=models, data=data, out=sweep_dir) for a in SWEEP]
    proc = subprocess.run(
        [sys.executable, "-m", "finetune", *args],
        check=False,
        cwd=PROJECT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = proc.stdout + proc.stderr
    results = _collect(sweep_dir) if sweep_dir.is_dir() else {}
    if not results:
        pytest.fail(
            f"the sweep ran no job (exit {proc.returncode}): python -m finetune {' '.join(args)}\n{_tail(output)}"
        )
    if REGENERATE:
        _write_golden(results, output)
    return {"results": results, "output": output, "returncode": proc.returncode}


def _write_golden(results: dict, output: str) -> None:
    missing = [
        f"{f}-{s}"
        for f, s in CASES
        if results.get((f, s), {}).get("status") != "completed" or len(results[(f, s)]["steps"]) != STEPS
    ]
    if missing:
        pytest.fail(f"not regenerating {GOLDEN}: no complete trajectory for {', '.join(missing)}\n{_tail(output)}")
    document = {
        "about": "Golden fp32 CPU training-loss trajectories: the loss logged at each of the first 5 optimizer steps "
        "of "
        "each tiny family x strategy, checked by tests/test_golden_losses.py (relative tolerance 1e-5 per "
        "step). Written by running the real code; never edit the numbers by hand.",
        "regenerate": REGENERATE_COMMAND,
        "generated_with": {**library_versions(), "cpu": cpu_name()},
        "settings": current_settings(),
        "trajectories": {
            f"{f}-{s}": {
                "model": FAMILIES[f][0],
                "family": FAMILIES[f][1],
                "strategy": s,
                "steps": results[(f, s)]["steps"],
            }
            for f, s in CASES
        },
    }
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN.write_text(_format(document) + "\n", encoding="utf-8")


def _format(value, depth: int = 0) -> str:
    """JSON, indented, with every value that fits on one line (a step: its loss and batch hashes) kept on one line."""
    compact = json.dumps(value)
    if not isinstance(value, (dict, list)) or len(compact) + 2 * depth <= 120:
        return compact
    pad = "  " * (depth + 1)
    if isinstance(value, dict):
        inner = [f"{pad}{json.dumps(k)}: {_format(v, depth + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(inner) + "\n" + "  " * depth + "}"
    return "[\n" + ",\n".join(pad + _format(v, depth + 1) for v in value) + "\n" + "  " * depth + "]"


def _golden() -> dict:
    if not GOLDEN.exists():
        pytest.fail(f"{GOLDEN} is missing; create it with: {REGENERATE_COMMAND}")
    return json.loads(GOLDEN.read_text(encoding="utf-8"))


def _version_changes(golden: dict) -> str:
    then, now = golden.get("generated_with", {}), library_versions()
    changed = [f"{k} {then.get(k)} -> {v}" for k, v in now.items() if then.get(k) != v]
    return (
        f"library versions since the golden file: {', '.join(changed)}"
        if changed
        else "same library versions as the golden file"
    )


def _name(family: str, strategy: str) -> str:
    return f"{FAMILY_NAMES[family]} + {STRATEGY_NAMES[strategy]} [{family}-{strategy}, model={FAMILIES[family][0]}]"


def test_golden_settings(request):
    """The golden file was made with this test's settings: an edit to the rows, the sweep's overrides or the pinned
    environment must come with a regenerated file (otherwise the loss tests below report the edit as drift)."""
    if REGENERATE:
        request.getfixturevalue("trajectories")  # writes the file this test reads
    recorded = _golden().get("settings")
    now = current_settings()
    differing = [key for key in now if (recorded or {}).get(key) != now[key]]
    assert not differing, (
        f"the settings in {Path(__file__).name} ({', '.join(differing)}) differ from those {GOLDEN.name} was "
        f"generated with; regenerate it: {REGENERATE_COMMAND}"
    )


@pytest.mark.parametrize(("family", "strategy"), CASES, ids=[f"{f}-{s}" for f, s in CASES])
def test_loss_trajectory(trajectories, family, strategy):
    name = _name(family, strategy)
    golden = _golden()
    expected = golden["trajectories"].get(f"{family}-{strategy}")
    assert expected is not None, (
        f"{GOLDEN.name} has no trajectory for {family}-{strategy}; regenerate it: {REGENERATE_COMMAND}"
    )
    run = trajectories["results"].get((family, strategy))
    assert run is not None and run["status"] == "completed", (
        f"{name}: the run did not complete (status {run and run['status']}, {run and run['error']})\n"
        f"{_tail(trajectories['output'])}"
    )

    config = run["config"]  # fp32 and no dropout, as resolved by the run itself
    assert (
        config["model"]["dtype"] == "float32" and not config["trainer"]["bf16"] and not config["trainer"].get("fp16")
    ), f"{name}: not an fp32 run (model.dtype={config['model']['dtype']}, trainer.bf16={config['trainer']['bf16']})"
    assert not config["strategy"].get("lora_dropout"), (
        f"{name}: strategy.lora_dropout={config['strategy']['lora_dropout']}"
    )

    got = run["steps"]
    assert [s["step"] for s in got] == list(range(1, STEPS + 1)), (
        f"{name}: logged steps {[s['step'] for s in got]}, expected 1..{STEPS}"
    )
    assert len(expected["steps"]) == STEPS, (
        f"{GOLDEN.name} holds {len(expected['steps'])} steps for {family}-{strategy}, not {STEPS}; regenerate it"
    )
    problems = []
    for want, have in zip(expected["steps"], got):
        if not math.isclose(have["loss"], want["loss"], rel_tol=RTOL, abs_tol=ATOL):
            relative = abs(have["loss"] - want["loss"]) / abs(want["loss"])
            problems.append(
                f"step {want['step']}: expected loss {want['loss']!r}, got {have['loss']!r} "
                f"(relative difference {relative:.2e} > {RTOL:g})"
            )
    if problems:
        hints = []
        if problems[0].startswith("step 1:"):
            hints.append(
                "step 1 is the loss before any optimizer update: the base model, its forward pass, the tokenizer "
                "or the batching changed, not only the training update"
            )
        changed_batches = [
            w["step"] for w, h in zip(expected["steps"], got) if h.get("batches") and w.get("batches") != h["batches"]
        ]
        if changed_batches:
            hints.append(
                f"the batches' token ids differ from the golden ones at step(s) {changed_batches} "
                "(data order, tokenization or template changed)"
            )
        else:
            hints.append(
                "the batches' token ids are the golden ones: the computation changed (forward, loss, backward or "
                "optimizer)"
            )
        if golden.get("settings") != current_settings():
            hints.append(
                "this test's settings differ from those the golden file was made with (test_golden_settings): "
                "that, not a library, changed the numbers"
            )
        hints.append(_version_changes(golden))
        pytest.fail(
            f"{name}: the loss trajectory drifted from {GOLDEN.relative_to(PROJECT)}\n  "
            + "\n  ".join(problems)
            + "\n"
            + "\n".join(f"  note: {h}" for h in hints)
            + f"\n  if the change is intended, regenerate and review the diff: {REGENERATE_COMMAND}",
            pytrace=False,
        )
