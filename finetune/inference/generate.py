"""`python -m finetune.generate <run_dir | adapter | model> prompt="..." [options]`, or `chat=true` to talk to it.

Try a trained model the way it was trained: the prompt is rendered with the chat template saved with the run's
tokenizer (the data template's), so the model sees exactly the text layout it learned; a completion-style run
(plain text) is continued as is. A run's adapter is loaded over its base with peft, and several adapters over one
base (`adapters=[runA,runB]`) can be switched in chat (`/adapter NAME`) to compare fine-tunes on the same input.
A base whose weights are not the ones an adapter was trained on is refused (exit 3), as merge refuses it, and so
is an adapter, model or merged folder whose files differ from its MANIFEST.json (finetune.checkpoints.check_final).

Decoding: temperature=0 (the default) is greedy; temperature>0 samples (top_k, top_p, seed apply then).
Generated text streams to stdout (beam search prints it when done); what was loaded goes to stderr.
In chat mode each stdin line is a user message; commands: /adapter NAME, /adapters, /reset, /exit.
"""

from __future__ import annotations

import json
import random
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from finetune import console as cli
from finetune.console import Option
from finetune.errors import ConfigError, IntegrityError
from finetune.inference import placement
from finetune.inference.prompting import Prompting
from finetune.runs import checkpoints, rundir

OPTIONS = [
    Option("prompt", str, None, "the text to complete (rendered with the run's chat template unless raw=true)"),
    Option("chat", bool, False, "interactive chat on stdin: /adapter NAME, /adapters, /reset, /exit"),
    Option("merged", bool, False, "use RUN/merged (python -m finetune.merge) instead of base + adapter"),
    Option(
        "adapters", list, [], "more adapters (run dirs or adapter folders) over the target's base, switchable in chat"
    ),
    Option("base", str, None, "base model folder or Hub id for an adapter (default: the run's model.name_or_path)"),
    Option(
        "dtype",
        str,
        None,
        "bfloat16 | float32 | float16 | auto (default: the run's model.dtype; float16 -> float32 on CPU)",
    ),
    Option(
        "quant",
        str,
        None,
        "4bit | 8bit | none: load the base quantized with bitsandbytes (default: a QLoRA adapter over the 4-bit base "
        "it trained on, else full weights; none: full weights)",
    ),
    Option(
        "device_map", str, None, "cpu | cuda | auto (spread over GPUs, then CPU) (default: cuda when there is a GPU)"
    ),
    Option("raw", bool, False, "send the prompt unchanged, without the chat template"),
    Option("system", str, None, "system message (conversation templates: chatml, sharegpt)"),
    Option("input", str, None, "the user message's extra field (alpaca's input, dolly's context)"),
    Option("max_new_tokens", int, 256, "most tokens to generate (generation also stops at EOS)"),
    Option("temperature", float, 0.0, "0: greedy; > 0: sample at this temperature"),
    Option("top_k", int, 0, "sampling: keep the k most likely tokens (0: all)"),
    Option("top_p", float, 1.0, "sampling: keep the smallest set of tokens with this probability mass (1: all)"),
    Option("num_beams", int, 1, "beam search with this many beams (output printed when done, not streamed)"),
    Option("repetition_penalty", float, 1.0, "> 1 discourages repeating tokens (1: off)"),
    Option("seed", int, None, "sampling seed, for reproducible samples (default: a random one, printed)"),
]
DECODING = ("max_new_tokens", "temperature", "top_k", "top_p", "num_beams", "repetition_penalty")  # seed: separate
DTYPES = ("bfloat16", "float32", "float16", "auto")
CHAT_COMMANDS = "/adapter NAME, /adapters, /reset, /exit"


@dataclass
class Plan:
    """What to load, checked before any weights are read: the model folder or base + adapters, tokenizer, prompting."""

    weights: Path  # the full-weights folder, or the base for adapters
    adapters: dict[str, Path]  # name -> adapter folder, in load order; empty for full weights
    prompting_by_name: dict[str, Prompting]  # by adapter name (or the model's name)
    first: str
    tokenizer: object
    dtype: str
    trust_remote_code: bool
    quant: str | None = None  # "4bit" | "8bit" (bitsandbytes) | None: full weights (finetune.inference.placement)
    device_map: str | None = None  # "auto" | "cpu" | "cuda" | None: cuda when there is a GPU, else cpu
    quantization: dict | None = None  # the BitsAndBytesConfig kwargs for quant (a QLoRA run's own, or the defaults)

    def load(self) -> Session:
        """Read the weights (safetensors only) where device_map says (default: the GPU when there is one), quantized
        as quant says, adapters over the base with peft."""
        import torch
        from transformers import AutoModelForCausalLM

        from finetune.models import load, neo_attention

        quantized = {"quantization_config": load.bnb_config(self.quantization)} if self.quantization else {}
        model = AutoModelForCausalLM.from_pretrained(
            str(self.weights),
            dtype=self.dtype if self.dtype == "auto" else getattr(torch, self.dtype),
            trust_remote_code=self.trust_remote_code,
            use_safetensors=True,
            device_map=placement.device_map_for(self.device_map),
            **quantized,
        )
        neo_attention.enable(model)  # GPT-Neo: SDPA with its local window (a no-op for the other families)
        if self.adapters:
            from peft import PeftModel

            names = list(self.adapters)
            model = PeftModel.from_pretrained(model, str(self.adapters[names[0]]), adapter_name=names[0])
            for name in names[1:]:
                model.load_adapter(str(self.adapters[name]), adapter_name=name)
            model.set_adapter(self.first)
        model.eval()
        return Session(model, self.tokenizer, self.prompting_by_name, list(self.adapters), self.first)


@dataclass
class Session:
    """A loaded model (with its adapters) and tokenizer; generate() renders prompts as the active adapter trained."""

    model: object
    tokenizer: object
    prompting_by_name: dict[str, Prompting]
    adapters: list[str] = field(default_factory=list)
    active: str | None = None

    @property
    def prompting(self) -> Prompting:
        return self.prompting_by_name[self.active]

    def use(self, name: str) -> None:
        """Make adapter `name` the active one."""
        if name not in self.adapters:
            loaded = ", ".join(self.adapters) or "none (full weights)"
            raise ConfigError(f"no adapter '{name}'; loaded adapters: {loaded}")
        self.model.set_adapter(name)
        self.active = name

    def generate(
        self,
        prompt: str | list[dict],
        *,
        raw: bool = False,
        system: str | None = None,
        input: str | None = None,
        stream: bool = False,
        **decoding,
    ) -> str:
        """The completion (new text only) of a prompt string or a list of messages, rendered for the active adapter."""
        return self.complete(self.prompting.text(self.tokenizer, prompt, raw, system, input), stream=stream, **decoding)

    def complete(self, text: str, *, stream: bool = False, seed: int | None = None, **decoding) -> str:
        """The continuation of already rendered text; stream=True prints it to stdout as it is generated."""
        import torch
        from transformers import TextStreamer, set_seed

        kwargs = generation_kwargs(**decoding)
        ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt").to(self.model.device)
        self._check_length(ids["input_ids"].shape[1], kwargs["max_new_tokens"])
        streams = stream and kwargs["num_beams"] == 1  # transformers cannot stream beam search
        streamer = TextStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True) if streams else None
        if seed is not None:
            set_seed(seed)
        eos = self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos
        with torch.no_grad():
            out = self.model.generate(**ids, **kwargs, eos_token_id=eos, pad_token_id=pad, streamer=streamer)
        completion = self.tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
        if stream and not streams:
            print(completion, flush=True)
        return completion

    def _check_length(self, prompt_tokens: int, max_new_tokens: int) -> None:
        context = getattr(self.model.config, "max_position_embeddings", None)
        if context and prompt_tokens + max_new_tokens > context:
            raise ConfigError(
                f"the prompt is {prompt_tokens} tokens; with max_new_tokens={max_new_tokens} that exceeds the "
                f"model's context of {context} tokens: shorten the prompt or lower max_new_tokens "
                "(in chat: /reset)"
            )


def generation_kwargs(
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    num_beams: int = 1,
    repetition_penalty: float = 1.0,
) -> dict:
    """model.generate() arguments; temperature=0 is greedy, > 0 samples. Raises ConfigError naming each bad value."""
    problems = []
    if max_new_tokens < 1:
        problems.append(f"max_new_tokens={max_new_tokens}: must be at least 1")
    if temperature < 0:
        problems.append(f"temperature={temperature}: must be 0 (greedy) or more (sampling)")
    if top_k < 0:
        problems.append(f"top_k={top_k}: must be 0 (off) or more")
    if not 0 < top_p <= 1:
        problems.append(f"top_p={top_p}: must be in (0, 1]")
    if temperature == 0 and (top_k or top_p < 1):
        problems.append("top_k / top_p only apply when sampling: set temperature>0 (temperature=0 is greedy)")
    if num_beams < 1:
        problems.append(f"num_beams={num_beams}: must be at least 1")
    if repetition_penalty <= 0:
        problems.append(f"repetition_penalty={repetition_penalty}: must be > 0 (1 is off)")
    if problems:
        raise ConfigError(problems)
    kwargs = {
        "max_new_tokens": max_new_tokens,
        "num_beams": num_beams,
        "repetition_penalty": repetition_penalty,
        "do_sample": temperature > 0,
    }
    if temperature > 0:
        kwargs.update(temperature=temperature, top_k=top_k, top_p=top_p)
    return kwargs


def plan(
    target: str | Path,
    merged: bool = False,
    adapters: list | None = None,
    base: str | None = None,
    dtype: str | None = None,
    quant: str | None = None,
    device_map: str | None = None,
) -> Plan:
    """Locate and check everything to load (bases of several adapters agree, the base is the one they trained on).
    quant: "4bit" | "8bit" | "none" | None, device_map: "auto" | "cpu" | "cuda" | None (finetune.inference.placement);
    unknown values are a ConfigError before anything is read."""
    placement.check(quant, device_map)
    located = rundir.locate(target, merged)
    if located.kind == "model":
        if adapters or base:
            raise ConfigError(
                f"{located.weights}: full weights; adapters= and base= are for an adapter target (give the "
                "first adapter as the target and its base with base=)"
            )
        checkpoints.check_final(located.weights)  # what training (model/) or merge (merged/) wrote: its MANIFEST.json
        check_weights(located)
        return _placed(_plan_model(located, dtype), quant, None, device_map)
    targets = _unique([located, *(rundir.locate(a) for a in adapters or [])])
    for each in targets:
        checkpoints.check_final(each.weights)  # each adapter is what training wrote: its MANIFEST.json
        check_weights(each)
    for other in targets[1:]:
        if other.kind != "adapter":
            raise ConfigError(f"adapters=: {other.weights} holds full weights, not an adapter")
        _check_same_base(targets[0], other)
    return _placed(_plan_adapters(targets, base, dtype), quant, (targets[0].base or {}).get("quantization"), device_map)


def _placed(loading: Plan, quant: str | None, recorded: dict | None, device_map: str | None) -> Plan:
    """The plan with its precision (quant, or a QLoRA run's own 4-bit base) and placement."""
    precision = placement.resolve(quant, recorded, loading.dtype, device_map)
    loading.quant, loading.quantization, loading.device_map = precision.quant, precision.quantization, device_map
    return loading


def check_weights(target: rundir.Target) -> None:
    """The weights files are there and whole (each safetensors header, and its tensors' offsets covering the file):
    what a folder without a manifest (from before manifests, or given directly) cannot prove otherwise. A missing or
    truncated file is an IntegrityError naming it, instead of peft's or safetensors' error from deep in the load."""
    from finetune.models import shards

    folder = target.weights
    if target.kind == "adapter":
        if not (folder / "adapter_model.safetensors").is_file():
            pickled = (
                " (only a pickled adapter_model.bin, which generate does not load)"
                if (folder / "adapter_model.bin").is_file()
                else ""
            )
            raise IntegrityError(
                f"{folder}: no adapter_model.safetensors{pickled}: the adapter was not completely written "
                "or copied; copy it again, or use the run's newest checkpoint (RUN/checkpoints/checkpoint-N)"
            )
        files = [folder / "adapter_model.safetensors"]
    else:
        files = [f for f in shards.weight_files(folder) if f.suffix == ".safetensors"]
    for path in files:
        with shards.ShardReader(path):  # IntegrityError: "<file>: not a valid safetensors file / the file is corrupt"
            pass


def load(
    target: str | Path,
    merged: bool = False,
    adapters: list | None = None,
    base: str | None = None,
    dtype: str | None = None,
    quant: str | None = None,
    device_map: str | None = None,
) -> Session:
    """A ready Session: `target` (run dir, adapter or model folder) loaded, with `adapters` over the same base."""
    return plan(target, merged, adapters, base, dtype, quant, device_map).load()


def _plan_model(target: rundir.Target, dtype: str | None) -> Plan:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(target.weights), trust_remote_code=_trust_remote_code(target))
    name = _name(target)
    prompting = {name: _prompting(target, tokenizer.chat_template)}
    return Plan(target.weights, {}, prompting, name, tokenizer, _dtype(dtype, target), _trust_remote_code(target))


def _plan_adapters(targets: list[rundir.Target], base: str | None, dtype: str | None) -> Plan:
    from transformers import AutoTokenizer

    from finetune.adapters import merge

    first = targets[0]
    base_dir = merge.base_folder(rundir.base_source(first, base), _model_config(first).get("revision"))
    merge.check_base(first, base_dir)
    names = [_name(t) for t in targets]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(
            f"adapters=: several adapters are named {', '.join(duplicates)} (after their run or folder "
            "names); copy one under another name"
        )
    trust = _trust_remote_code(first)
    tokenizers = [
        AutoTokenizer.from_pretrained(
            str(t.weights if _has_tokenizer(t.weights) else base_dir), trust_remote_code=trust
        )
        for t in targets
    ]
    prompting = {name: _prompting(t, tok.chat_template) for name, t, tok in zip(names, targets, tokenizers)}
    return Plan(
        base_dir,
        {n: t.weights for n, t in zip(names, targets)},
        prompting,
        names[0],
        tokenizers[0],
        _dtype(dtype, first),
        trust,
    )


def _unique(targets: list[rundir.Target]) -> list[rundir.Target]:
    """The target first, then the other adapters; one given twice (target and in adapters=) is loaded once."""
    seen, unique = set(), []
    for target in targets:
        if target.weights.resolve() not in seen:
            seen.add(target.weights.resolve())
            unique.append(target)
    return unique


def _check_same_base(first: rundir.Target, other: rundir.Target) -> None:
    """Adapters share one base: refuse two trained on different ones (weights fingerprints, else the bases' names)."""
    (name_a, print_a), (name_b, print_b) = _recorded_base(first), _recorded_base(other)
    if (print_a != print_b) if print_a and print_b else (name_a != name_b):
        raise ConfigError(
            f"adapters=: {_name(first)} ({first.weights}) was trained on {_base_label(name_a, print_a)}, "
            f"{_name(other)} ({other.weights}) on {_base_label(name_b, print_b)}: adapters switched in one "
            "session must share their base; try them in separate sessions"
        )


def _recorded_base(target: rundir.Target) -> tuple[str, str | None]:
    """The base an adapter names (adapter_config.json) and the weights fingerprint training recorded
    (base_model.json)."""
    config = json.loads((target.weights / "adapter_config.json").read_text(encoding="utf-8"))
    return str(config.get("base_model_name_or_path")), (target.base or {}).get("weights_fingerprint")


def _base_label(name: str, weights: str | None) -> str:
    return f"{name} (weights {weights[:12]}...)" if weights else name


def _prompting(target: rundir.Target, chat_template: str | None) -> Prompting:
    """From the run's data template when known; the chat template is the one saved with the tokenizer."""
    if target.template_path is None:
        return Prompting("chat", chat_template) if chat_template else Prompting("raw")
    from finetune.data import templates

    template = templates.load(str(target.template_path))
    name = Path(
        str((target.config or {}).get("data", {}).get("template") or template.name)
    ).stem  # data_template.yaml is a copy
    chat_template = chat_template or template.chat_template
    if template.conversation_spec:
        return Prompting("conversation", chat_template, name)
    user = next((m for m in template.messages if m.get("role") == "user"), None)
    if user is None:  # completion: the model was trained on plain text
        return Prompting("raw", chat_template, name)
    return Prompting("fields", chat_template, name, tuple(k for k in user if k not in ("role", "content")))


def _name(target: rundir.Target) -> str:
    """The run's name for its own weights, else the folder's; characters peft refuses in adapter names become _."""
    folder = target.weights
    name = target.run_dir.name if target.run_dir and folder.parent == target.run_dir else folder.name
    return re.sub(r"[^\w-]", "_", name)


def _dtype(requested: str | None, target: rundir.Target) -> str:
    """The requested dtype, else the run's, else the checkpoint's own; float16 becomes float32 on a CPU."""
    import torch

    dtype = requested or _model_config(target).get("dtype") or (target.base or {}).get("training_dtype") or "auto"
    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype}: choose one of {', '.join(DTYPES)}")
    if dtype == "float16" and not torch.cuda.is_available():
        cli.say("float16 on a CPU is slow and imprecise: using float32")
        return "float32"
    return dtype


def _model_config(target: rundir.Target) -> dict:
    return (target.config or {}).get("model") or {}


def _trust_remote_code(target: rundir.Target) -> bool:
    return _model_config(target).get("trust_remote_code") is True


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer_config.json").is_file()


def chat(session: Session, decoding: dict, system: str | None = None, lines=None) -> None:
    """Read user messages from `lines` (stdin), reply to each with the whole conversation rendered; commands start
    with /."""
    lines = sys.stdin if lines is None else lines
    decoding = dict(decoding)
    seed = decoding.pop("seed", None)
    if seed is not None:  # once: the conversation is reproducible, and each reply draws fresh samples
        from transformers import set_seed

        set_seed(seed)
    history = session.prompting.start(system)
    cli.say(f"chat with {_describe(session)}; commands: {CHAT_COMMANDS}")
    for line in _prompted(lines):
        text = line.strip()
        if text == "/exit":
            return
        if text.startswith("/"):
            history = _command(session, text, history, system)
        elif text:
            history = _reply(session, history, text, decoding)


def _reply(session: Session, history: list[dict], text: str, decoding: dict) -> list[dict]:
    """Stream the reply to `text`; the conversation with both turns (raw prompts keep no history; an error, none)."""
    raw = session.prompting.kind == "raw"
    turns = history if raw else history + [session.prompting.user(text)]
    try:
        reply = session.complete(
            text if raw else session.prompting.text(session.tokenizer, turns), stream=True, **decoding
        )
    except ConfigError as err:
        cli.say(f"error: {err}")
        return history
    return turns if raw else turns + [{"role": "assistant", "content": reply}]


def _command(session: Session, text: str, history: list[dict], system: str | None) -> list[dict]:
    """Run a chat command; the conversation after it."""
    command, _, argument = text.partition(" ")
    argument = argument.strip()
    if command == "/reset":
        cli.say("conversation cleared")
        return session.prompting.start(system)
    if command == "/adapters":
        cli.say(f"adapters: {_adapter_list(session)}")
    elif command == "/adapter" and argument in session.adapters:
        session.use(argument)
        cli.say(
            f"active adapter: {session.active} ({_describe_prompting(session.prompting)}); the conversation is kept"
        )
    elif command == "/adapter":
        cli.say(f"no adapter '{argument}'; adapters: {_adapter_list(session)}")
    else:
        cli.say(f"unknown command {command}; commands: {CHAT_COMMANDS}")
    return history


def _prompted(lines):
    """The input lines, showing a prompt on stderr when a person types them."""
    interactive = hasattr(lines, "isatty") and lines.isatty()
    while True:
        if interactive:
            print("you> ", end="", file=sys.stderr, flush=True)
        line = lines.readline()
        if not line:
            return
        yield line


def _adapter_list(session: Session) -> str:
    if not session.adapters:
        return "none (full weights)"
    return ", ".join(f"{name} (active)" if name == session.active else name for name in session.adapters)


def _describe(session: Session) -> str:
    what = f"adapter {session.active}" if session.adapters else session.active
    return f"{what} ({_describe_prompting(session.prompting)})"


def _describe_prompting(prompting: Prompting) -> str:
    return f"{prompting.label}: raw text, continued as is" if prompting.kind == "raw" else prompting.label


def run(opts: dict) -> str | None:
    """The CLI: check options and the prompt before loading weights, then generate once or chat."""
    decoding = {key: opts[key] for key in DECODING}
    generation_kwargs(**decoding)  # bad values fail before the weights load
    if opts["chat"] == (opts["prompt"] is not None):
        raise ConfigError("give prompt=TEXT for one completion, or chat=true for a conversation on stdin (not both)")
    if opts["chat"] and (opts["raw"] or opts["input"] is not None):
        raise ConfigError("raw= and input= go with prompt=; in chat each line is a user message")
    decoding["seed"] = opts["seed"]
    if opts["temperature"] > 0 and opts["seed"] is None:
        decoding["seed"] = random.SystemRandom().randrange(2**31)
        cli.say(f"sampling with seed={decoding['seed']} (pass it to repeat this sample)")
    placement.check(opts["quant"], opts["device_map"])  # before locating anything
    loading = plan(
        opts["target"], opts["merged"], opts["adapters"], opts["base"], opts["dtype"], opts["quant"], opts["device_map"]
    )
    first = loading.prompting_by_name[loading.first]
    if opts["chat"]:
        first.start(opts["system"])  # a system message the template cannot render fails here, not after loading
    else:
        text = first.text(loading.tokenizer, opts["prompt"], opts["raw"], opts["system"], opts["input"])
    cli.quiet_libraries()
    adapters = f" with adapters {', '.join(loading.adapters)}" if loading.adapters else ""
    precision = f", {placement.describe(loading.quantization)}" if loading.quantization else ""
    cli.say(f"loading {loading.weights}{adapters} ({loading.dtype}{precision})")
    session = loading.load()
    if opts["chat"]:
        return chat(session, decoding, opts["system"])
    cli.say(f"generating with {_describe(session)}")
    return session.complete(text, stream=True, **decoding)


def main(argv: list[str] | None = None) -> None:
    cli.main(run, __doc__, OPTIONS, positional="target", argv=argv)


if __name__ == "__main__":
    main()
