"""`finetune serve RUN [RUN ...] [host=127.0.0.1] [port=8000] [options]`: an OpenAI-compatible HTTP server for runs of
GPT-Neo, GPT-J, Pythia and GPT-NeoX, adapters included, which vLLM, TGI and llama.cpp do not serve for this family.

Each RUN is a run directory, an adapter folder or a full (merged) model folder. Adapters trained on the same base are
served over one copy of it, with requests for different adapters decoded in the same batch; a base that differs
from the one an adapter was trained on is refused (exit 3), as generate and merge refuse it. A QLoRA adapter is
served over its own 4-bit base (quant= overrides that for all).

Served names (the `model` of a request, listed by GET /v1/models): each adapter's run name (its folder's name outside
a run), each full model's likewise (a run's merged/ as RUN-merged), and each base under its adapters by its folder
name or Hub id (-4bit / -8bit appended when quantized): `model=<base>` generates with no adapter. Two models under
one name are refused at start.

Prompts are rendered with each run's own chat template, exactly as training rendered them; /v1/completions continues
raw text. Docs: README.md, "Serve". The API key comes from api_key= or $FINETUNE_API_KEY (better: a command line is
visible to every user of the machine in `ps`); it is never printed or logged, nor are prompts and completions unless
log_prompts=true. SIGTERM (or Ctrl-C): stop taking connections, let requests in flight finish for up to
shutdown_timeout seconds, cancel the rest, exit 0.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from finetune import console as cli
from finetune.console import Option
from finetune.errors import ConfigError
from finetune.inference import generate, placement
from finetune.runs import rundir

OPTIONS = [
    Option("host", str, "127.0.0.1", "address to listen on (0.0.0.0: every interface; use api_key= then)"),
    Option("port", int, 8000, "TCP port"),
    Option(
        "api_key",
        str,
        None,
        "require Authorization: Bearer KEY on /v1/* and /metrics (default: $FINETUNE_API_KEY; prefer the variable: "
        "a command line shows in ps)",
    ),
    Option("base", str, None, "the base model folder or Hub id for every adapter (default: each run's recorded base)"),
    Option("dtype", str, None, "bfloat16 | float32 | float16 | auto (default: each run's model.dtype)"),
    Option("quant", str, None, "4bit | 8bit | none: the bases' precision (default: a QLoRA run's own 4-bit base)"),
    Option("device_map", str, None, "cpu | cuda | auto (default: cuda when there is a GPU)"),
    Option("max_batch", int, 16, "most requests decoding together in one model's batch"),
    Option("max_queue", int, 64, "most requests waiting for a batch row, per model; past it: 429 with Retry-After"),
    Option("max_n", int, 4, "most choices (n) one request may ask for"),
    Option("max_tokens_limit", int, 1024, "most tokens one choice may generate (and the default: what fits, up to it)"),
    Option(
        "shutdown_timeout", float, 30.0, "seconds requests in flight may finish after SIGTERM before they are cancelled"
    ),
    Option("log_prompts", bool, False, "log each request's prompt and completion (off: they may be private)"),
]
LIMITS = ("max_batch", "max_queue", "max_n", "max_tokens_limit")


def parse(argv: list[str]) -> dict:
    """Options and the RUNs; an unknown option is named without its value (it may be a mistyped api_key)."""
    known = {option.name for option in OPTIONS}
    hidden = [
        arg if "=" not in arg or arg.partition("=")[0] in known else f"{arg.partition('=')[0]}=..." for arg in argv
    ]
    return cli.parse(hidden, OPTIONS, positional="runs", many=True)


@dataclass
class Group:
    """One model to load (a base with its adapters, or full weights) and the names it is served under."""

    plan: generate.Plan
    names: dict[str, str]  # served name -> its key in plan.prompting_by_name (an adapter's name, or the model's)
    base: str | None = None  # the base's served name, under adapters


def plans(runs: list, opts: dict) -> list[Group]:
    """What to load: each full model, and each base with every adapter trained on it, in the order given (a QLoRA
    adapter's 4-bit base is another model than the same weights in full). Every check runs here, before any weights
    load: the files against their manifests, each adapter's base, the served names."""
    placement.check(opts["quant"], opts["device_map"])
    members: dict[tuple, list] = {}
    for run in runs:
        target = rundir.locate(run)
        if target.kind == "model":
            key = ("model", str(target.weights.resolve()))
        else:
            _check_not_dora(target)
            recorded = (target.base or {}).get("quantization") if opts["quant"] is None else None
            key = ("adapter", rundir.base_source(target, opts["base"]), json.dumps(recorded, sort_keys=True))
        members.setdefault(key, []).append((run, target))
    _check_names([served_name(target) for group in members.values() for _, target in group])
    found = []
    for (kind, *_), group in members.items():
        (first, target), rest = group[0], [run for run, _ in group[1:]]
        more = {"adapters": rest, "base": opts["base"]} if kind == "adapter" else {}
        plan = generate.plan(first, dtype=opts["dtype"], quant=opts["quant"], device_map=opts["device_map"], **more)
        if more:
            base = base_name(rundir.base_source(target, opts["base"]), plan.quant)
            found.append(Group(plan, {name: name for name in plan.adapters}, base))
        else:
            found.append(Group(plan, {served_name(target): plan.first}))
    _check_names([name for group in found for name in [*group.names, group.base] if name is not None])
    return found


def _check_not_dora(target: rundir.Target) -> None:
    """peft's mixed-adapter batches refuse DoRA adapters (`adapter_names` with use_dora): one would fail every step of
    its base's batch, so it is refused here, with the way that works."""
    config = json.loads((target.weights / "adapter_config.json").read_text(encoding="utf-8"))
    if config.get("use_dora"):
        raise ConfigError(
            f"{target.weights}: a DoRA adapter, which peft cannot mix with other requests in a batch; merge it "
            "(finetune merge RUN) and serve RUN/merged"
        )


def served_name(target: rundir.Target) -> str:
    """An adapter or full model's served name: its run's (as generate names it), a merged model's run name + -merged."""
    name = generate._name(target)
    merged = target.kind == "model" and target.run_dir is not None and target.weights.name == rundir.MERGED_DIR
    return f"{name}-merged" if merged else name


def base_name(source: str, quant: str | None) -> str:
    """A base's served name: its folder's name, or its Hub id; -4bit / -8bit appended when loaded quantized."""
    path = Path(source).expanduser()
    name = path.name if path.is_dir() else source
    return re.sub(r"[^\w./-]", "_", name) + (f"-{quant}" if quant else "")


def _check_names(names: list[str]) -> None:
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ConfigError(
            f"several models would be served as {', '.join(duplicates)} (a run's name, an adapter or model folder's "
            "name, or a base's): serve one of them, or copy it under another name"
        )


def load(found: list[Group], opts: dict) -> dict:
    """The served models by name, each base loaded once with its adapters, on an engine of its own (running)."""
    from transformers import AutoTokenizer

    from finetune.inference.batching import BASE, Engine
    from finetune.inference.prompting import Prompting
    from finetune.inference.serve_app import Served

    served = {}
    for group in found:
        plan = group.plan
        adapters = f" with adapters {', '.join(plan.adapters)}" if plan.adapters else ""
        precision = f", {placement.describe(plan.quantization)}" if plan.quantization else ""
        cli.say(f"loading {plan.weights}{adapters} ({plan.dtype}{precision})")
        engine = Engine.spawn(lambda plan=plan: _engine(plan, opts))  # loaded on the thread that runs it
        context = engine.context
        tokenizer = copy.deepcopy(engine.tokenizer)  # the event loop's: the engine thread decodes with the original
        if group.base is not None:
            chat_template = AutoTokenizer.from_pretrained(str(plan.weights)).chat_template  # the base's own, if any
            prompting = Prompting("chat", chat_template) if chat_template else Prompting("raw")
            served[group.base] = Served(group.base, engine, BASE, tokenizer, prompting, context)
        for name, key in group.names.items():
            adapter = key if plan.adapters else BASE
            served[name] = Served(name, engine, adapter, tokenizer, plan.prompting_by_name[key], context, group.base)
    return served


def _engine(plan: generate.Plan, opts: dict):
    """Load the plan's model and make its engine (called on the engine's own thread)."""
    from finetune.inference.batching import Engine

    session = plan.load()
    context = getattr(session.model.config, "max_position_embeddings", None) or 2048
    return Engine(
        session.model, session.tokenizer, max_batch=opts["max_batch"], max_queue=opts["max_queue"], context=context
    )


def build(opts: dict):
    """The FastAPI app for the parsed options: RUNs planned (every check before any weights load), then loaded."""
    from finetune.inference.serve_app import Limits, create_app

    problems = [f"{name}={opts[name]}: must be at least 1" for name in LIMITS if opts[name] < 1]
    if opts["max_n"] > opts["max_queue"]:  # a request's n choices are queued together
        problems.append(
            f"max_n={opts['max_n']} is more than max_queue={opts['max_queue']}: such a request would never fit"
        )
    if problems:
        raise ConfigError(problems)
    found = plans(opts["runs"], opts)
    cli.quiet_libraries()
    models = load(found, opts)
    api_key = opts["api_key"] or os.environ.get("FINETUNE_API_KEY") or None
    limits = Limits(opts["max_n"], opts["max_tokens_limit"], api_key, opts["log_prompts"])
    return create_app(models, limits)


def run(opts: dict) -> None:
    """The CLI: build the app, serve it with uvicorn until SIGTERM or Ctrl-C, exit 0."""
    try:  # the serve extra; without it, say how to install it rather than fail on an import deep in build()
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn
    except ImportError as err:
        raise ConfigError(f"finetune serve needs the serve extra: pip install 'neo-finetune[serve]' ({err})") from None

    if opts["shutdown_timeout"] < 0:
        raise ConfigError(f"shutdown_timeout={opts['shutdown_timeout']}: must be 0 or more seconds")
    app = build(opts)
    _log_lines()
    keyed = (
        "an API key is required"
        if app.state.api.limits.api_key
        else "no API key: anyone who reaches the port may use it"
    )
    cli.say(f"serving {', '.join(app.state.api.models)} on http://{opts['host']}:{opts['port']}/v1 ({keyed})")
    config = uvicorn.Config(
        app,
        host=opts["host"],
        port=opts["port"],
        timeout_graceful_shutdown=opts["shutdown_timeout"],
        log_level="info",
    )
    # uvicorn shuts down gracefully on SIGTERM/SIGINT, then raises the signal again for the handler it found: this one
    # makes that an orderly exit 0 (a stop asked for), not death by signal.
    signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        uvicorn.Server(config).run()
    except KeyboardInterrupt:
        pass


def _log_lines() -> None:
    """The server's own log lines (log_prompts) on stderr, in the style of ours."""
    logger = logging.getLogger("finetune.serve")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[finetune] %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help", "help") for a in args):
        print(cli.usage(__doc__, OPTIONS))
        return None
    return cli.exiting_on_errors(lambda: run(parse(args)))


if __name__ == "__main__":
    main()
