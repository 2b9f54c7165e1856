"""`finetune inspect attention RUN prompt="..." [layers=0,3] [heads=0,1] [compare=true] [out=DIR]`: where the run's
model looks while it reads one prompt, drawn and measured.

The prompt is rendered with the run's template exactly as `finetune generate` renders it (raw=true: sent as is) and
must fit in the model's context on its own. The model is loaded as generate loads it (base + adapter as the run
trained it, float32 on a CPU, the run's dtype on a GPU), then switched to transformers' exact eager attention;
compare=true also draws the base (the adapter disabled, no second copy) and the difference fine-tuned - base.

Output, in RUN/inspect/attention-<hash of the rendered prompt>/ or out=DIR (a folder inspect did not write is never
replaced), its paths printed on stdout:
  attention.png   a grid of layers x heads, query rows and key columns; GPT-Neo's local layers with their window's
                  edge; with compare=true three grids: base, fine-tuned, difference
  attention.json  per layer, per head and over heads: mean attention distance (tokens) and mean row entropy (nats),
                  with the prompt, its token count, the layers and heads drawn, the family, window and dtype
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from finetune import console as cli
from finetune.console import Option
from finetune.errors import ConfigError, did_you_mean
from finetune.inference import generate, placement
from finetune.inspect import attention
from finetune.runs import artifacts, report, rundir

OPTIONS = [
    Option("prompt", str, None, "the text to read (rendered with the run's chat template unless raw=true)"),
    Option(
        "layers", list, [], "layer indices (default: all up to 8, else 8 evenly spread with the first and the last)"
    ),
    Option("heads", list, [], "head indices (default: all up to 8, else the first 8)"),
    Option("compare", bool, False, "also draw the base (the adapter disabled) and the difference fine-tuned - base"),
    Option("out", str, None, "output folder (default: RUN/inspect/attention-HASH)"),
    Option("raw", bool, False, "send the prompt unchanged, without the chat template"),
    Option("system", str, None, "system message (conversation templates: chatml, sharegpt)"),
    Option("input", str, None, "the user message's extra field (alpaca's input, dolly's context)"),
    Option("base", str, None, "base model folder or Hub id for an adapter (default: the run's model.name_or_path)"),
]
SUBCOMMANDS = ("attention",)
INSPECT_DIR = "inspect"  # RUN/inspect/attention-HASH
MARKER = ".neo-finetune-inspect"  # in every folder inspect writes: it replaces only such a folder (or an empty one)


def main(argv: list[str] | None = None) -> Path | None:
    return cli.main(run, __doc__, OPTIONS, positional="words", argv=argv, many=True)


def run(opts: dict) -> Path:
    """Check the words, prompt, layers, heads and out= before any weights load; then capture, draw and measure."""
    target_path = _target(opts["words"])
    if opts["prompt"] is None or not opts["prompt"].strip():
        raise ConfigError('prompt=: empty; give the text whose attention to draw: prompt="..."')
    cli.quiet_libraries()
    import torch
    from transformers import AutoConfig

    loading = generate.plan(target_path, base=opts["base"], dtype=None if torch.cuda.is_available() else "float32")
    target = rundir.locate(target_path)
    if opts["compare"] and not loading.adapters:
        raise ConfigError(
            f"compare=true: {target.weights} holds full weights, not an adapter over a base: there is no base to "
            "compare with (inspect the base model itself, or a run with an adapter)"
        )
    prompting = loading.prompting_by_name[loading.first]
    text = prompting.text(loading.tokenizer, opts["prompt"], opts["raw"], opts["system"], opts["input"])
    ids = loading.tokenizer(text, add_special_tokens=False)["input_ids"]
    config = AutoConfig.from_pretrained(str(loading.weights), trust_remote_code=loading.trust_remote_code)
    attention.check_fits(config, len(ids), "raw=true (as is)" if opts["raw"] else prompting.label)
    layers, heads = attention.select(config, opts["layers"], opts["heads"])
    out = _out(opts["out"], target, text)
    precision = placement.describe(loading.quantization)
    cli.say(f"loading {target.weights} ({loading.dtype}, {precision}) for {len(ids)} tokens, layers {layers}")
    model = loading.load().model
    maps = attention.compute(model, torch.tensor([ids]), config, layers, heads, opts["compare"])
    pieces = [loading.tokenizer.decode([i]) for i in ids]
    dtype = str(model.dtype).removeprefix("torch.")
    record = {
        "target": str(target.weights),
        "prompt": opts["prompt"],
        "text": text,
        "tokens": len(ids),
        "token_texts": pieces,
        "family": config.model_type,
        "window": maps.window,
        "dtype": dtype,
        "quantization": precision,
        "layers": layers,
        "heads": heads,
        "compare": opts["compare"],
        "per_layer": attention.summary(maps),
    }
    where = "/".join(target.weights.parts[-2:])
    heading = f"{where} ({config.model_type}, {dtype}): {len(ids)} tokens of {_excerpt(opts['prompt'])}"
    written = _write(out, maps, attention.token_labels(pieces), heading, record)
    report.refresh(target.run_dir)  # the run's report.html shows the maps
    return written


def _target(words: list[str]) -> str:
    """The RUN after the sub-command word."""
    if words[0] not in SUBCOMMANDS:
        raise ConfigError(
            f"sub-command '{words[0]}': unknown{did_you_mean(words[0], SUBCOMMANDS)}; choose one of "
            f"{', '.join(SUBCOMMANDS)}: finetune inspect attention RUN prompt=..."
        )
    if len(words) != 2:
        found = f"got {words[1:]}" if words[1:] else "none given"
        raise ConfigError(f"{words[0]}: expected exactly one RUN (run directory, adapter or model folder) ({found})")
    return words[1]


def _out(given: str | None, target: rundir.Target, text: str) -> Path:
    """out=, else RUN/inspect/attention-HASH (the hash of the weights' place in the run and the rendered prompt, so
    a checkpoint and the final adapter keep their own); refused when it is not inspect's to write."""
    if given:
        out = Path(given).expanduser()
    elif target.run_dir is None:
        raise ConfigError(f"out=: {target.weights} is not in a run directory; name the output folder with out=DIR")
    else:
        where = target.weights.relative_to(target.run_dir).as_posix()
        digest = hashlib.sha256(f"{where}\n{text}".encode()).hexdigest()[:10]
        out = target.run_dir / INSPECT_DIR / f"attention-{digest}"
    if out.resolve().is_relative_to(target.weights.resolve()):
        raise ConfigError(f"out={out}: inside the weights folder {target.weights}; choose a folder outside it")
    if out.exists() and not (out.is_dir() and ((out / MARKER).is_file() or not any(out.iterdir()))):
        raise ConfigError(
            f"out={out}: exists and was not written by inspect (no {MARKER}); inspect replaces only its own "
            "output: choose another out="
        )
    return out


def _write(out: Path, maps: attention.Maps, labels: list[str], heading: str, record: dict) -> Path:
    """attention.png and attention.json into `out` (marked as inspect's first), each written whole or not at all."""
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by finetune inspect, which replaces only folders with this file\n")
    png, partial = out / "attention.png", out / ".attention.png.tmp"
    attention.draw(maps, labels, partial, heading)
    os.replace(partial, png)
    artifacts.write_json(out / "attention.json", record)
    cli.say(f"attention maps of {len(maps.layers)} layer(s) x {len(maps.heads)} head(s) written to {out}")
    print(png)
    print(out / "attention.json")
    return out


def _excerpt(prompt: str, limit: int = 60) -> str:
    return repr(prompt if len(prompt) <= limit else prompt[:limit] + "...")


if __name__ == "__main__":
    main()
