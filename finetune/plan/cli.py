"""`finetune plan [conf=PRESET] [gpu=h100-80gb] [num_gpus=1] [mfu=0.4] [key=value ...] [--json]`: will this config
fit my GPU, and how long will it take? Reads no weights and downloads nothing (also `python -m finetune.plan`).

The config is composed and validated as training does (any override training takes works here too:
trainer.per_device_train_batch_size=4 data.max_length=1024 distributed=zero3 strategy=qlora). Checks that only
concern the machine the planner runs on (no CUDA for QLoRA, DeepSpeed not installed, no Hub access) become notes.
The architecture is the model's config.json: a local checkpoint folder's, the tiny builder's recipe, or the copy
shipped in finetune/models/model_configs/ for every Hub model in conf/model/. Parameter counts come from
instantiating it on the meta device; an adapter's trainable count from peft applied to that meta model.

Memory, per GPU: frozen and trainable weights, gradients, optimizer states, activations (the tensors each layer keeps
for backward, worked out per family from the transformers/peft/trl code this project pins, at the config's
micro-batch and max_length, with and without gradient checkpointing), trl's fused LM head (it never builds the
b x s x vocab logits: it works in 4096 x 32768 tiles), DeepSpeed ZeRO / FSDP partitioning and CPU offload, and a
fixed CUDA context. On CUDA the dtypes follow bf16 autocast (fp32 LayerNorm, pow and softmax outputs, bf16 matmuls);
on CPU (gpu=cpu) everything is fp32. It fits when the total stays under the GPU's memory less `headroom`; when it
does not, the cheapest changes that make it fit are re-planned and shown. Time: FLOPs per token, tokens/s at `mfu` x
the GPU's dense peak, seconds per optimizer step and for the whole run (rows padded to max_length: an upper bound).

Validated against measured peaks on CPU (fp32) only: benchmarks/plan_accuracy.py, benchmarks/RESULTS.md.

`serve=true` plans serving instead (finetune generate, the server): for bf16, fp16, fp32 and bitsandbytes 4bit / 8bit
(generate's quant=), the weights, `serve_adapters` LoRA adapters, the KV cache of `serve_batch` concurrent sequences of
`serve_context` tokens (2 x layers x hidden x bytes per token) and the prefill working memory; whether that fits one
GPU, the largest batch that does, and how many GPUs device_map=auto needs (finetune.plan.serving).

    python -m finetune.plan conf=lora_neox20b gpu=h100-80gb
    python -m finetune.plan conf=full_neox20b gpu=h100-80gb num_gpus=8 --json
    python -m finetune.plan conf=lora_neo2.7b gpu=l4-24gb trainer.per_device_train_batch_size=8 data.max_length=2048
    python -m finetune.plan conf=lora_neox20b serve=true serve_batch=16 serve_context=2048 gpu=h100-80gb

The `# plan (...)` line at the top of every preset (and in the recipes) is rewritten by a developer script:
python benchmarks/sync_plan_headers.py (--check lists the stale ones).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys

from finetune import console
from finetune.config.compose import CONF_DIR
from finetune.console import Option
from finetune.errors import ConfigError, FinetuneError, did_you_mean
from finetune.plan import serving
from finetune.plan.hardware import GPUS
from finetune.plan.planning import plan_preset, serve_preset
from finetune.plan.render import as_json, gib_or_dash, render, tflops

OPTIONS = [
    Option("gpu", str, "h100-80gb", "GPU model (see the table in --help), or cpu"),
    Option("num_gpus", int, 1, "GPUs (one process each); ZeRO-2/3 shard over them, plain DDP replicates"),
    Option("mfu", float, 0.4, "share of the GPU's dense peak sustained on the FLOPs executed (recompute included)"),
    Option("headroom", float, 0.1, "share of GPU memory left free for allocator fragmentation and spikes"),
    Option("format", str, "text", "text | json (the same as --json)"),
    Option("serve", bool, False, "plan serving the preset's model (generate, the server) instead of training it"),
    Option("serve_batch", int, 16, "serve: concurrent sequences, each with its own KV cache"),
    Option("serve_context", int, None, "serve: tokens per sequence, prompt + generated (default: the model's context)"),
    Option("serve_adapters", int, None, "serve: LoRA adapters loaded at once (default: 1 for adapter strategies)"),
]
SERVE_OPTIONS = ("serve_batch", "serve_context", "serve_adapters")
FLAGS = ("--json",)
MOVED_FLAGS = {  # flags of the planner that became a developer script
    "--sync-headers": "python benchmarks/sync_plan_headers.py",
    "--check-headers": "python benchmarks/sync_plan_headers.py --check",
}


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help", "help") for a in args):
        print(help_text())
        return
    try:
        preset, options, overrides = parse_args(args)
        serve = {key: options.pop(key, None) for key in ("serve", *SERVE_OPTIONS)}
        as_text = options_format(args, options) != "json"
        if serve["serve"]:
            result = serve_preset(
                preset,
                overrides,
                options["gpu"],
                options["num_gpus"],
                options["headroom"],
                serve["serve_batch"],
                serve["serve_context"],
                serve["serve_adapters"],
            )
            print(serving.render(result) if as_text else json.dumps(serving.as_json(result), indent=2))
            return
        result = plan_preset(preset, overrides, **options)
        print(render(result) if as_text else json.dumps(as_json(result), indent=2))
    except FinetuneError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)


def help_text() -> str:
    rows = [
        f"  {g.key:<14} {g.name:<30} {gib_or_dash(g.memory_gib):>8} {tflops(g.bf16_tflops):>10}" for g in GPUS.values()
    ]
    table = "\n".join([f"  {'gpu=':<14} {'':<30} {'memory':>8} {'bf16 peak':>10}", *rows])
    return "\n".join(
        [
            console.usage(__doc__, OPTIONS),
            "",
            "GPUs (dense tensor-core peak, no sparsity; T4 has no bf16):",
            table,
            "",
            "flags: --json (the plan as JSON)",
        ]
    )


def options_format(args: list[str], options: dict) -> str:
    return "json" if "--json" in args else options["format"]


def parse_args(args: list[str]) -> tuple[str | None, dict, list[str]]:
    """(preset, planner options, Hydra overrides). A key=value whose key is one of ours is an option; the rest go to
    Hydra, except a bare word close to one of our options, which is reported as the misspelled option it likely is."""
    from finetune.config.compose import split_preset

    preset, rest = split_preset(args)
    ours, overrides, problems = [], [], []
    names = [o.name for o in OPTIONS]
    for arg in rest:
        key = arg.split("=", 1)[0]
        if arg in FLAGS:
            continue
        if arg in MOVED_FLAGS:
            problems.append(f"{arg}: the preset header lines are a developer script's now: {MOVED_FLAGS[arg]}")
        elif arg.startswith("-"):
            problems.append(f"unknown flag '{arg}'; flags: {', '.join(FLAGS)}")
        elif key in names:
            ours.append(arg)
        elif (
            "." not in key.lstrip("+~")
            and key not in _config_root_keys()
            and (hint := did_you_mean(key, names, cutoff=0.7))
        ):
            problems.append(f"unknown option '{arg}'{hint}")
        else:
            overrides.append(arg)
    if problems:
        raise ConfigError(problems)
    options = console.parse(ours, OPTIONS)
    stray = [arg.split("=", 1)[0] + "=" for arg in ours if arg.split("=", 1)[0] in SERVE_OPTIONS]
    if stray and not options["serve"]:
        raise ConfigError(f"{', '.join(stray)}: only with serve=true (the serving plan)")
    if not options["serve"]:  # the training plan's options are plan_preset's keywords (benchmarks/sync_plan_headers.py)
        for key in ("serve", *SERVE_OPTIONS):
            del options[key]
    if options["format"] not in ("text", "json"):
        raise ConfigError(f"format={options['format']}: choose text or json")
    return preset, options, overrides


@functools.cache
def _config_root_keys() -> frozenset:
    names = {p.stem for p in CONF_DIR.iterdir() if p.is_dir()}
    from finetune.config.schema import RunConfig

    return frozenset(names | {f.name for f in dataclasses.fields(RunConfig)})


if __name__ == "__main__":
    main()
