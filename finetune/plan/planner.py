"""`python -m finetune.plan [conf=PRESET] [gpu=h100-80gb] [num_gpus=1] [mfu=0.4] [key=value ...] [--json]`: will this
config fit my GPU, and how long will it take? Reads no weights and downloads nothing.

The config is composed and validated as training does (any override training takes works here too:
trainer.per_device_train_batch_size=4 data.max_length=1024 distributed=zero3 strategy=qlora). Checks that only
concern the machine the planner runs on (no CUDA for QLoRA, DeepSpeed not installed, no Hub access) become notes.
The architecture is the model's config.json: a local checkpoint folder's, the tiny builder's recipe, or the copy
shipped in finetune/model_configs/ for every Hub model in conf/model/. Parameter counts come from instantiating it
on the meta device; an adapter's trainable count from peft applied to that meta model.

Memory, per GPU: frozen and trainable weights, gradients, optimizer states, activations (the tensors each layer keeps
for backward, worked out per family from the transformers/peft/trl code this project pins, at the config's
micro-batch and max_length, with and without gradient checkpointing), trl's fused LM head (it never builds the
b x s x vocab logits: it works in 4096 x 32768 tiles), DeepSpeed ZeRO / FSDP partitioning and CPU offload, and a
fixed CUDA context. On CUDA the dtypes follow bf16 autocast (fp32 LayerNorm, pow and softmax outputs, bf16 matmuls);
on CPU (gpu=cpu) everything is fp32. It fits when the total stays under the GPU's memory less `headroom`; when it does not, the cheapest
changes that make it fit are re-planned and shown. Time: FLOPs per token, tokens/s at `mfu` x the GPU's dense
peak, seconds per optimizer step and for the whole run (rows padded to max_length: an upper bound).

Validated against measured peaks on CPU (fp32) only: benchmarks/plan_accuracy.py, benchmarks/RESULTS.md.

    python -m finetune.plan conf=lora_neox20b gpu=h100-80gb
    python -m finetune.plan conf=full_neox20b gpu=h100-80gb num_gpus=8 --json
    python -m finetune.plan conf=lora_neo2.7b gpu=l4-24gb trainer.per_device_train_batch_size=8 data.max_length=2048
    python -m finetune.plan --sync-headers     rewrite the `# plan (...)` line of every preset in conf/
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import json
import math
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from finetune import console as cli
from finetune.config import precision
from finetune.console import Option
from finetune.config.compose import CONF_DIR, PACKAGE_DIR
from finetune.errors import ConfigError, FinetuneError

MODEL_CONFIGS_DIR = PACKAGE_DIR / "models" / "model_configs"
GIB = 2**30
CUDA_CONTEXT_BYTES = int(0.75 * GIB)  # CUDA context, cuBLAS/cuDNN workspaces and kernels of torch 2.x: a fixed charge
NCCL_BYTES = int(0.5 * GIB)  # NCCL communicators and their buffers when more than one GPU takes part
HEAD_TILE_ROWS, HEAD_TILE_COLS = 4096, 32768  # trl.kernels.chunked_logprob: tokens x vocabulary per projection tile
HEAD_FALLBACK_TILES = (3, 8)  # fp32 tiles trl's torch fallback (no Triton: CPU) keeps besides its buffer: forward, backward
HEAD_FALLBACK_WEIGHT_GRAD_TILES = 1  # and, when the head trains, the transposed tile its weight-gradient addmm copies
ZERO3_GATHERED_LAYERS = 2  # ZeRO-3 holds the layer it computes and the one it prefetches, gathered in bf16
QLORA_BYTES_PER_PARAM = {True: 0.5 + 1 / 64 + 4 / (64 * 256), False: 0.5 + 4 / 64}  # NF4 + absmax, by double quantization
DEFAULT_TRAIN_TOKENS = 100_000_000  # "per 100M tokens" when the config does not fix the run's length
MIN_MAX_LENGTH = 128

OPTIONS = [
    Option("gpu", str, "h100-80gb", "GPU model (see the table in --help), or cpu"),
    Option("num_gpus", int, 1, "GPUs (one process each); ZeRO-2/3 shard over them, plain DDP replicates"),
    Option("mfu", float, 0.4, "share of the GPU's dense peak sustained on the FLOPs executed (recompute included)"),
    Option("headroom", float, 0.1, "share of GPU memory left free for allocator fragmentation and spikes"),
    Option("format", str, "text", "text | json (the same as --json)"),
]
FLAGS = ("--json", "--sync-headers", "--check-headers")


@dataclass(frozen=True)
class Gpu:
    key: str
    name: str
    memory_gib: float | None
    """What nvidia-smi reports as total memory (None: CPU, RAM is not checked)."""
    bf16_tflops: float | None
    """Dense tensor-core peak (no sparsity); None: no bf16 on this GPU."""
    fp16_tflops: float | None
    fp32_tflops: float | None
    """Plain fp32 (PyTorch leaves TF32 matmuls off by default)."""


GPUS = {
    gpu.key: gpu
    for gpu in (
        Gpu("t4-16gb", "NVIDIA T4 16GB", 15.0, None, 65.0, 8.1),
        Gpu("l4-24gb", "NVIDIA L4 24GB", 22.5, 121.0, 121.0, 30.3),
        Gpu("a10-24gb", "NVIDIA A10 24GB", 22.5, 125.0, 125.0, 31.2),
        Gpu("rtx4090-24gb", "NVIDIA GeForce RTX 4090 24GB", 24.0, 165.2, 165.2, 82.6),
        Gpu("a100-40gb", "NVIDIA A100 40GB", 40.0, 312.0, 312.0, 19.5),
        Gpu("a100-80gb", "NVIDIA A100 80GB", 80.0, 312.0, 312.0, 19.5),
        Gpu("h100-80gb", "NVIDIA H100 80GB SXM", 79.6, 989.0, 989.0, 67.0),
        Gpu("h200-141gb", "NVIDIA H200 141GB", 140.4, 989.0, 989.0, 67.0),
        Gpu("cpu", "CPU (RAM)", None, None, None, None),
    )
}

# Which tensor feeds each Linear of a layer: the first/second LayerNorm's output, the attention output, the MLP
# activation. Decides what a trainable layer or an adapter keeps for backward, and which inputs are shared.
LINEAR_INPUTS = {
    "gpt_neo": {"q_proj": "ln1", "k_proj": "ln1", "v_proj": "ln1", "out_proj": "attn", "c_fc": "ln2", "c_proj": "act"},
    "gptj": {"q_proj": "ln1", "k_proj": "ln1", "v_proj": "ln1", "out_proj": "attn", "fc_in": "ln1", "fc_out": "act"},
    "gpt_neox": {"query_key_value": "ln1", "dense": "attn", "dense_h_to_4h": "ln2", "dense_4h_to_h": "act"},
}
SDPA_FAMILIES = ("gpt_neox", "gpt_neo")  # GPT-Neo's is finetune.neo_attention; GPT-J has eager and FA2 only
ADAMW = ("adamw_torch", "adamw_torch_fused", "adamw_hf", "adamw_apex_fused", "adamw_torch_xla", "adamw_torch_npu_fused",
         "adamw_anyprecision", "adamw")
EIGHT_BIT = ("_8bit", "8bit")


# --- what the run looks like ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Architecture:
    """Facts of the model read from its config and its meta-device instance."""

    source: str
    family: str
    layers: int
    hidden: int
    heads: int
    inner: int
    vocab: int
    positions: int
    activation: str
    rotary_dim: int
    parallel_residual: bool
    tied_embeddings: bool
    total_params: int
    embedding_params: int
    """Input embeddings (token and position): looked up, never multiplied."""
    output_embedding_params: int
    """The LM head's own weight (0 when tied to the input embedding)."""
    matmul_params: int
    """Weights of every Linear, the LM head included: 2 FLOPs each per token forward."""
    layer_linears: dict
    """Leaf name -> (in_features, out_features) of the Linears of one layer."""
    largest_linear: int
    layer_params: int
    buffer_bytes: int


@dataclass(frozen=True)
class Adapter:
    """What peft makes trainable, counted by peft on the meta model."""

    trainable: int
    wrapped: tuple
    """Per layer: the leaf names of its Linears that carry an adapter."""
    rank: int
    dropout: float
    dora: bool


@dataclass(frozen=True)
class Setup:
    """The settings of the config that decide memory and time."""

    strategy: str
    micro_batch: int
    max_length: int
    grad_accum: int
    checkpointing: bool
    optimizer: str
    device: str
    weight_bytes: int
    autocast: str | None
    attention: str
    backend: str
    zero_stage: int
    offload_optimizer: bool
    offload_params: bool
    deepspeed_bf16: bool
    packing: bool
    quant_double: bool

    @property
    def compute_bytes(self) -> int:
        """Matmul outputs: the autocast dtype, else the weights' dtype."""
        return 2 if self.autocast else self.weight_bytes

    @property
    def norm_bytes(self) -> int:
        """LayerNorm outputs: autocast runs layer_norm in fp32."""
        return 4 if self.autocast else self.weight_bytes

    @property
    def norm_input_copy(self) -> bool:
        """Autocast casts a bf16 LayerNorm input to fp32 and keeps that copy for backward."""
        return bool(self.autocast) and self.weight_bytes != 4

    @property
    def sharded(self) -> bool:
        return self.zero_stage == 3


@dataclass
class MemoryLine:
    name: str
    bytes: int
    detail: str = ""


@dataclass
class Suggestion:
    change: str
    overrides: list
    num_gpus: int
    total_bytes: int
    fits: bool
    tokens_per_second: float | None
    """An upper bound when state is offloaded to CPU (offload is CPU- and PCIe-bound)."""
    cpu_offload_bytes: int = 0
    note: str = ""


@dataclass
class Plan:
    preset: str | None
    gpu: Gpu
    num_gpus: int
    model: str
    architecture_source: str
    family: str
    strategy: str
    total_params: int
    trainable_params: int
    micro_batch: int
    max_length: int
    grad_accum: int
    checkpointing: bool
    precision: str
    optimizer: str
    distributed: str
    memory: list
    """Per GPU (per process on CPU): MemoryLine entries that sum to total_bytes."""
    total_bytes: int
    capacity_bytes: int | None
    usable_bytes: int | None
    fits: bool | None
    activations_without_checkpointing: int
    activations_with_checkpointing: int
    activation_peak_at: str
    activations_kept_after_forward: int
    cpu_offload_bytes: int
    flops_per_token: float
    flops_terms: str
    peak_tflops: float | None
    mfu: float
    tokens_per_second: float | None
    tokens_per_step: int
    step_seconds: float | None
    run_steps: int | None
    run_tokens: int
    run_seconds: float | None
    run_basis: str
    suggestions: list = field(default_factory=list)
    notes: list = field(default_factory=list)


# --- entry points ---------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help", "help") for a in args):
        print(help_text())
        return
    try:
        if "--sync-headers" in args or "--check-headers" in args:
            stale = sync_headers(write="--sync-headers" in args)
            for line in stale:
                print(line)
            if stale and "--check-headers" in args:
                sys.exit(1)
            return
        preset, options, overrides = parse_args(args)
        result = plan_preset(preset, overrides, **options)
        print(json.dumps(as_json(result), indent=2) if options_format(args, options) == "json" else render(result))
    except FinetuneError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)


def help_text() -> str:
    rows = [f"  {g.key:<14} {g.name:<30} {_gib_or_dash(g.memory_gib):>8} {_tflops(g.bf16_tflops):>10}"
            for g in GPUS.values()]
    table = "\n".join([f"  {'gpu=':<14} {'':<30} {'memory':>8} {'bf16 peak':>10}", *rows])
    return "\n".join([cli.usage(__doc__, OPTIONS), "", "GPUs (dense tensor-core peak, no sparsity; T4 has no bf16):", table,
                      "", "flags: --json, --sync-headers (rewrite preset header lines), --check-headers (list stale ones, exit 1)"])


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
        if arg.startswith("-"):
            problems.append(f"unknown flag '{arg}'; flags: {', '.join(FLAGS)}")
        elif key in names:
            ours.append(arg)
        elif "." not in key.lstrip("+~") and key not in _config_root_keys() and difflib.get_close_matches(key, names, n=1, cutoff=0.7):
            problems.append(f"unknown option '{arg}' (did you mean '{difflib.get_close_matches(key, names, n=1, cutoff=0.7)[0]}'?)")
        else:
            overrides.append(arg)
    if problems:
        raise ConfigError(problems)
    options = cli.parse(ours, OPTIONS)
    if options["format"] not in ("text", "json"):
        raise ConfigError(f"format={options['format']}: choose text or json")
    return preset, options, overrides


@functools.cache
def _config_root_keys() -> frozenset:
    names = {p.stem for p in CONF_DIR.iterdir() if p.is_dir()}
    from finetune.config.schema import RunConfig

    return frozenset(names | {f.name for f in dataclasses.fields(RunConfig)})


def plan_preset(preset: str, overrides: list[str], gpu: str = "h100-80gb", num_gpus: int = 1, mfu: float = 0.4,
                headroom: float = 0.1, format: str = "text") -> Plan:
    """Compose `conf=preset` with overrides as training does, then plan it."""
    from hydra.errors import ConfigCompositionException, MissingConfigException

    from finetune.config.compose import preflight
    from finetune.config.compose import compose_with_overrides, presets

    find_gpu(gpu)  # an unknown GPU fails before any composition
    check_options(num_gpus, mfu, headroom)
    if preset not in presets():
        raise ConfigError(preflight(preset, overrides)[0])
    try:
        cfg, _ = compose_with_overrides(preset, overrides)
    except (ConfigCompositionException, MissingConfigException):
        raise ConfigError(preflight(preset, overrides)[0] or [f"cannot compose conf={preset} with {overrides}"]) from None
    return plan(cfg, gpu, num_gpus, mfu, headroom, preset=preset)


def plan(cfg, gpu: str = "h100-80gb", num_gpus: int = 1, mfu: float = 0.4, headroom: float = 0.1,
         preset: str | None = None, suggest: bool = True) -> Plan:
    """The memory and time plan of a composed config (a DictConfig from finetune.config.compose, or its resolved
    dict) on `num_gpus` x `gpu`. Validates it as training does; raises ConfigError naming every problem."""
    device = find_gpu(gpu)
    check_options(num_gpus, mfu, headroom)
    resolved, notes = checked_config(cfg)
    return plan_resolved(resolved, device, num_gpus, mfu, headroom, preset, notes, suggest)


def check_options(num_gpus: int, mfu: float, headroom: float) -> None:
    problems = []
    if num_gpus < 1:
        problems.append(f"num_gpus={num_gpus}: must be 1 or more")
    if not 0 < mfu <= 1:
        problems.append(f"mfu={mfu}: a share of the peak, in (0, 1], e.g. mfu=0.4")
    if not 0 <= headroom < 1:
        problems.append(f"headroom={headroom}: a share of the GPU's memory, in [0, 1), e.g. headroom=0.1")
    if problems:
        raise ConfigError(problems)


def find_gpu(name: str) -> Gpu:
    """The GPU table entry for a name such as h100-80gb (case and _ / - insensitive)."""
    key = re.sub(r"[\s_]+", "-", str(name).strip().lower())
    if key in GPUS:
        return GPUS[key]
    close = difflib.get_close_matches(key, list(GPUS), n=1, cutoff=0.4)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise ConfigError(f"gpu={name}: not a GPU the planner knows{hint}; choose one of: {', '.join(GPUS)}")


# --- validation ----------------------------------------------------------------------------------------------------

# Problems that concern the machine the planner runs on, not the plan: they become notes.
MACHINE_PROBLEMS = (
    "trainer.fp16 / model.dtype=float16 on CPU",
    "strategy=qlora: no CUDA GPU, and bitsandbytes",
    "strategy=qlora: bitsandbytes is not installed",
    "distributed: DeepSpeed is not installed",
    "output_dir:",
)
# Warnings about how this process was launched: the planner's num_gpus= stands for the launch.
LAUNCH_WARNINGS = ("distributed=ddp in a single process", "distributed=fsdp in a single process")


def checked_config(cfg) -> tuple[dict, list[str]]:
    """validate() as training runs it, with a Hub model's architecture checks run against its shipped config.json
    (the planner never contacts the Hub); problems of this machine only (no CUDA, no DeepSpeed) become notes."""
    from omegaconf import OmegaConf

    from finetune.config.validate import validate

    container = cfg if isinstance(cfg, dict) else _resolved_or_none(cfg)
    if container is None:  # does not resolve: validate() says why
        validate(cfg)
    model = container["model"]
    offline = dict(container)
    if not Path(model["name_or_path"]).expanduser().exists() and not model.get("tiny"):
        shipped = shipped_config_path(model)
        if shipped is None:
            raise ConfigError(no_architecture_problem(model))
        offline["model"] = {**model, "name_or_path": str(shipped)}
    notes = []
    try:
        resolved, warnings = validate(OmegaConf.create(offline))
        notes += [f"warning: {w}" for w in warnings if not w.startswith(LAUNCH_WARNINGS)]
    except ConfigError as err:
        real = [p for p in err.problems if not p.startswith(MACHINE_PROBLEMS)]
        if real:
            raise ConfigError(real) from None
        resolved = json.loads(json.dumps(offline))
        notes += [f"on this machine training would stop: {p}" for p in err.problems]
    resolved["model"]["name_or_path"] = model["name_or_path"]
    return resolved, notes


def _resolved_or_none(cfg) -> dict | None:
    from omegaconf import OmegaConf

    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    except Exception:  # noqa: BLE001 - validate() reports it with the key
        return None


def no_architecture_problem(model: dict) -> str:
    known = ", ".join(sorted(p.stem.replace("__", "/") for p in MODEL_CONFIGS_DIR.glob("*.json")))
    return (f"model.name_or_path: no architecture for '{model['name_or_path']}': not a local folder with config.json and "
            f"not one of the Hub models shipped in finetune/model_configs/ ({known}); set model.name_or_path=DIR to a "
            "checkpoint folder (its config.json is enough)")


# --- architecture ---------------------------------------------------------------------------------------------------


def shipped_config_path(model: dict) -> Path | None:
    """finetune/model_configs/<hub id, / as __>.json for the model's Hub id (case-insensitive), if shipped."""
    hub_id = model.get("hub_id") or model.get("name_or_path") or ""
    wanted = hub_id.replace("/", "__").lower() + ".json"
    return next((p for p in MODEL_CONFIGS_DIR.glob("*.json") if p.name.lower() == wanted), None)


def architecture_config(model: dict):
    """(transformers config, where it came from): a local folder's config.json, the tiny recipe, or the shipped copy."""
    from transformers import AutoConfig

    from finetune.models import tiny

    path = Path(model["name_or_path"]).expanduser()
    if (path / "config.json").is_file():
        return AutoConfig.from_pretrained(str(path)), f"{path / 'config.json'}"
    if model.get("tiny"):
        return tiny.model_config(model["tiny"]), f"the tiny {model['tiny']} recipe (finetune.tiny)"
    shipped = shipped_config_path(model)
    if shipped is None:
        raise ConfigError(no_architecture_problem(model))
    return AutoConfig.from_pretrained(str(shipped)), f"finetune/model_configs/{shipped.name}"


def architecture(model: dict) -> Architecture:
    config, source = architecture_config(model)
    return _architecture(config.to_json_string(), source, model["family"])


@functools.lru_cache(maxsize=32)
def _architecture(config_json: str, source: str, family: str) -> Architecture:
    import torch
    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM

    config = _config_from_json(config_json, AutoConfig)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    layers = _layers(model)
    linears = {name.rsplit(".", 1)[-1]: (m.in_features, m.out_features) for name, m in layers[0].named_modules()
               if isinstance(m, nn.Linear)}
    unknown = sorted(set(linears) - set(LINEAR_INPUTS.get(family, {})))
    if family not in LINEAR_INPUTS or unknown:
        raise ConfigError(f"model.family: the planner knows the layers of {', '.join(LINEAR_INPUTS)}; {family} has "
                          f"Linears it cannot place ({', '.join(unknown)})")
    input_embeddings = model.get_input_embeddings()
    output = model.get_output_embeddings()
    tied = output is not None and output.weight is input_embeddings.weight
    embeddings = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Embedding))
    head_dim = config.hidden_size // config.num_attention_heads
    rotary = getattr(config, "rotary_dim", None) or int(head_dim * _partial_rotary(config)) if family != "gpt_neo" else 0
    return Architecture(
        source=source,
        family=family,
        layers=len(layers),
        hidden=config.hidden_size,
        heads=config.num_attention_heads,
        inner=max(out for (_, out) in linears.values()) if family != "gpt_neox" else linears["dense_h_to_4h"][1],
        vocab=config.vocab_size,
        positions=getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 0),
        activation=getattr(config, "activation_function", None) or getattr(config, "hidden_act", "gelu"),
        rotary_dim=rotary or 0,
        parallel_residual=family == "gptj" or bool(getattr(config, "use_parallel_residual", False)),
        tied_embeddings=tied,
        total_params=sum(p.numel() for p in model.parameters()),
        embedding_params=embeddings,
        output_embedding_params=0 if tied or output is None else output.weight.numel(),
        matmul_params=sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear)),
        layer_linears=linears,
        largest_linear=max(i * o for (i, o) in linears.values()),
        layer_params=sum(p.numel() for p in layers[0].parameters()),
        buffer_bytes=sum(b.numel() * b.element_size() for b in model.buffers()),
    )


def _config_from_json(config_json: str, auto_config):
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "config.json").write_text(config_json, encoding="utf-8")
        return auto_config.from_pretrained(folder)


def _partial_rotary(config) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    return float(rope.get("partial_rotary_factor", getattr(config, "rotary_pct", 1.0)))


def _layers(model):
    from torch import nn

    layers = [m for m in model.base_model.children() if isinstance(m, nn.ModuleList)]
    if not layers:
        raise ConfigError(f"model: cannot find the layer list of {type(model).__name__}")
    return layers[0]


def adapter(model: dict, strategy: dict, arch: Architecture) -> Adapter | None:
    """peft's trainable parameters for an adapter strategy, applied to the meta model (None for full fine-tuning)."""
    from finetune.models.strategy import ADAPTER_STRATEGIES, OUR_KEYS

    if strategy["name"] not in ADAPTER_STRATEGIES:
        return None
    config, _ = architecture_config(model)
    lora = {k: v for k, v in strategy.items() if k not in OUR_KEYS}
    lora["use_dora"] = strategy["name"] == "dora" or bool(lora.get("use_dora"))
    return _adapter(config.to_json_string(), json.dumps(lora, sort_keys=True, default=str))


@functools.lru_cache(maxsize=32)
def _adapter(config_json: str, lora_json: str) -> Adapter:
    import torch
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer
    from transformers import AutoConfig, AutoModelForCausalLM

    lora = json.loads(lora_json)
    config = _config_from_json(config_json, AutoConfig)
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(config)
    # low_cpu_mem_usage: peft creates the adapter weights on the meta device too (and fast, outside the device context).
    # peft 0.21 reads transformers' deprecated is_gradient_checkpointing: its FutureWarning is not the user's business.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\.")
        model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", **lora), low_cpu_mem_usage=True)
    layers = _layers(model.get_base_model())
    wrapped = tuple(tuple(sorted(name.rsplit(".", 1)[-1] for name, m in layer.named_modules() if isinstance(m, LoraLayer)))
                    for layer in layers)
    return Adapter(
        trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
        wrapped=wrapped,
        rank=int(lora.get("r", 8)),
        dropout=float(lora.get("lora_dropout", 0.0)),
        dora=bool(lora.get("use_dora")),
    )


# --- settings ------------------------------------------------------------------------------------------------------


def trainer_setting(trainer: dict, key: str):
    """trainer.KEY as trl.SFTConfig will take it (its default when the config does not set it)."""
    if key in trainer:
        return trainer[key]
    from trl import SFTConfig

    default = {f.name: f.default for f in dataclasses.fields(SFTConfig)}[key]
    return default.value if hasattr(default, "value") else default


def setup_of(resolved: dict, device: Gpu) -> Setup:
    trainer, model, strategy, data = resolved["trainer"], resolved["model"], resolved["strategy"], resolved["data"]
    fp16 = bool(trainer_setting(trainer, "fp16"))
    bf16 = trainer_setting(trainer, "bf16")
    bf16 = (not fp16) if bf16 is None else bool(bf16)
    autocast = "bfloat16" if bf16 else "float16" if fp16 else None
    distributed = resolved.get("distributed") or {"backend": "none"}
    backend = distributed.get("backend", "none")
    stage, offload_optimizer, offload_params, ds_bf16 = 0, False, False, bool(autocast)
    optimizer = str(trainer_setting(trainer, "optim"))
    if backend == "deepspeed":
        ds = distributed.get("deepspeed") or {}
        if ds.get("optimizer"):  # DeepSpeed's own optimizer replaces trainer.optim
            optimizer = f"{ds['optimizer'].get('type', 'AdamW')} (DeepSpeed)"
        zero = ds.get("zero_optimization") or {}
        stage = int(zero.get("stage", 0))
        offload_optimizer = (zero.get("offload_optimizer") or {}).get("device", "none") in ("cpu", "nvme")
        offload_params = (zero.get("offload_param") or {}).get("device", "none") in ("cpu", "nvme")
        enabled = (ds.get("bf16") or {}).get("enabled", "auto")
        ds_bf16 = bool(autocast) if enabled == "auto" else bool(enabled)
    elif backend == "fsdp":  # reshard_after_forward: full sharding (ZeRO-3-like); without it ZeRO-2-like
        fsdp = distributed.get("fsdp_config") or {}
        stage = 3 if fsdp.get("reshard_after_forward", True) else 2
        offload_optimizer = offload_params = bool(fsdp.get("cpu_offload"))
    attention = model.get("attn_implementation") or ("sdpa" if model["family"] in SDPA_FAMILIES else "eager")
    quantization = strategy.get("quantization") or {}
    return Setup(
        strategy=strategy["name"],
        micro_batch=int(trainer_setting(trainer, "per_device_train_batch_size")),
        max_length=int(data["max_length"]),
        grad_accum=int(trainer_setting(trainer, "gradient_accumulation_steps")),
        checkpointing=bool(trainer_setting(trainer, "gradient_checkpointing")),
        optimizer=optimizer,
        device="cpu" if device.key == "cpu" else "cuda",
        weight_bytes=4 if model["dtype"] == "float32" else 2,
        autocast=autocast,
        attention=attention,
        backend=backend,
        zero_stage=stage,
        offload_optimizer=offload_optimizer,
        offload_params=offload_params,
        deepspeed_bf16=ds_bf16,
        packing=data.get("packing") is True,  # auto packs only rows that gain; unpacked is the upper bound
        quant_double=bool(quantization.get("bnb_4bit_use_double_quant", False)),
    )


def adapter_bytes(setup: Setup) -> int:
    """dtype of LoRA weights: peft upcasts them to fp32 (autocast_adapter_dtype=True), except where trl keeps them
    in bf16 (QLoRA) or in the base's dtype (LoRA under ZeRO-3), and where DeepSpeed casts the whole module to bf16."""
    if setup.strategy == "qlora" or (setup.backend == "deepspeed" and setup.deepspeed_bf16):
        return 2
    if setup.backend == "deepspeed" and setup.zero_stage == 3:
        return setup.weight_bytes
    return 4


# --- memory --------------------------------------------------------------------------------------------------------


@dataclass
class Activations:
    peak: int
    peak_at: str
    kept_after_forward: int
    """What the forward leaves for backward (no working set): checked directly by benchmarks/plan_accuracy.py."""
    with_checkpointing: int
    without_checkpointing: int


def memory_lines(arch: Architecture, adapter_: Adapter | None, setup: Setup, num_gpus: int) -> tuple[list, int]:
    """Per-GPU memory lines and the bytes offloaded to CPU RAM per GPU."""
    shards = num_gpus if setup.sharded else 1
    trainable = adapter_.trainable if adapter_ else arch.total_params
    frozen = arch.total_params if adapter_ else 0
    lines, cpu = [], 0

    frozen_bytes, frozen_detail = frozen_weight_bytes(arch, setup, frozen)
    if frozen:
        if setup.offload_params:
            cpu += frozen_bytes // shards
            frozen_detail += ", offloaded to CPU (ZeRO-3 offload_param)"
            frozen_bytes = 0
        lines.append(MemoryLine("frozen weights", frozen_bytes // shards, frozen_detail + _shard_note(shards)))

    param_bytes, grad_bytes, state_bytes, state_detail = trainable_bytes(setup, adapter_ is not None)
    zero = setup.backend in ("deepspeed", "fsdp") and setup.zero_stage > 0  # optimizer state (and from stage 2 gradients) sharded
    weights = trainable * param_bytes // shards
    grads = trainable * grad_bytes // (num_gpus if zero and setup.zero_stage >= 2 else shards)
    states = trainable * state_bytes // (num_gpus if zero else shards)
    kind = "adapter" if adapter_ else "model"
    if setup.offload_params:
        cpu, weights = cpu + weights, 0
    lines.append(MemoryLine(f"trainable weights ({kind})", weights, f"{trainable:,} x {param_bytes} B" + _shard_note(shards)))
    if setup.offload_optimizer:
        cpu += states + (grads if setup.zero_stage >= 2 else 0)
        states = 0
        grads = grads if setup.zero_stage < 2 else 0
        state_detail += ", offloaded to CPU (ZeRO offload_optimizer)"
    lines.append(MemoryLine("gradients", grads, f"{grad_bytes} B each" + _shard_note(num_gpus if zero and setup.zero_stage >= 2 else 1)))
    lines.append(MemoryLine("optimizer states", states, state_detail + _shard_note(num_gpus if zero else 1)))
    if num_gpus > 1 and setup.backend not in ("deepspeed", "fsdp"):
        lines.append(MemoryLine("DDP gradient buckets", trainable * grad_bytes, "DDP copies gradients into buckets of the same size"))
    if setup.backend in ("deepspeed", "fsdp") and setup.zero_stage >= 2:
        lines.append(MemoryLine("sharding buffers", zero_buffer_bytes(arch, setup), zero_buffer_detail(setup)))
    if arch.buffer_bytes >= 2**20:
        lines.append(MemoryLine("model buffers", arch.buffer_bytes, "causal-mask and rotary tables the model registers"))
    if setup.device == "cuda":
        lines.append(MemoryLine("CUDA context (fixed)", CUDA_CONTEXT_BYTES + (NCCL_BYTES if num_gpus > 1 else 0),
                                "context, cuBLAS workspaces" + (", NCCL buffers" if num_gpus > 1 else "")))
    if setup.strategy == "qlora":
        lines.append(MemoryLine("4-bit dequantization", arch.largest_linear * setup.compute_bytes,
                                "the largest Linear dequantized to bf16 while it runs"))
    if adapter_ and adapter_.dora:
        lines.append(MemoryLine("DoRA weight norm", 3 * arch.largest_linear * 4,
                                "W, B@A and W + B@A of the largest Linear in fp32 while its column norms are taken"))
    return lines, cpu


def frozen_weight_bytes(arch: Architecture, setup: Setup, frozen: int) -> tuple[int, str]:
    if setup.strategy != "qlora":
        return frozen * setup.weight_bytes, f"{frozen:,} x {setup.weight_bytes} B ({_dtype_name(setup.weight_bytes)})"
    per_layer = sum(i * o for (i, o) in arch.layer_linears.values())
    quantized = per_layer * arch.layers
    nf4 = QLORA_BYTES_PER_PARAM[setup.quant_double]
    rest = frozen - quantized
    detail = (f"{quantized:,} in NF4 at {nf4:.3f} B (with {'double ' if setup.quant_double else ''}quantization constants) "
              f"+ {rest:,} unquantized (embeddings, LM head, norms, biases) x {setup.compute_bytes} B")
    return int(quantized * nf4) + rest * setup.compute_bytes, detail


def trainable_bytes(setup: Setup, is_adapter: bool) -> tuple[int, int, int, str]:
    """(weight, gradient, optimizer-state) bytes per trainable parameter and what the states are."""
    if setup.backend == "deepspeed" and setup.deepspeed_bf16:
        param = 2
        master = 4
    else:
        param = adapter_bytes(setup) if is_adapter else setup.weight_bytes
        master = 0
    moments, per_moment, name = optimizer_states(setup.optimizer)
    state_bytes = master + moments * (per_moment or max(param, 4 if master else param))
    detail = f"{name}: {moments} x {(per_moment or max(param, 4 if master else param))} B"
    if master:
        detail = f"fp32 master copy 4 B + {detail} (DeepSpeed mixed precision)"
    elif not is_adapter and param == 2:
        detail += " (full fine-tuning in bf16: no fp32 master copy)"
    return param, param, state_bytes, detail


def optimizer_states(name: str) -> tuple[int, int | None, str]:
    """(moments kept per parameter, bytes each or None for the parameter's dtype, description)."""
    low = name.lower()
    if any(tag in low for tag in EIGHT_BIT):
        return 2, 1, f"{name} (8-bit moments)"
    if low in ADAMW or low.startswith("adam"):
        return 2, None, f"{name} (two moments)"
    if "lion" in low:
        return 1, None, f"{name} (one moment)"
    if low.startswith("sgd"):
        return 0, None, f"{name} (no momentum)"
    if "adafactor" in low:
        return 0, None, f"{name} (factored second moments, close to 0)"
    return 2, None, f"{name} (unknown to the planner: assumed AdamW-like, two moments)"


def zero_buffer_bytes(arch: Architecture, setup: Setup) -> int:
    """ZeRO-2: reduce buckets; ZeRO-3 / FSDP full shard: also the gathered weights of the block computed and the one
    prefetched (DeepSpeed caps them at stage3_max_live_parameters, 1e9)."""
    bucket = arch.hidden**2 * 2  # reduce_bucket_size auto = hidden^2 elements, in bf16
    if setup.zero_stage < 3:
        return 2 * bucket
    largest = max(arch.layer_params, arch.output_embedding_params, arch.embedding_params)
    return ZERO3_GATHERED_LAYERS * min(largest, 10**9) * 2 + 2 * bucket


def zero_buffer_detail(setup: Setup) -> str:
    if setup.zero_stage < 3:
        return "gradient reduce buckets (hidden^2 elements each)"
    return f"{ZERO3_GATHERED_LAYERS} gathered layers in bf16 (computed + prefetched) and gradient reduce buckets"


def activations(arch: Architecture, adapter_: Adapter | None, setup: Setup) -> Activations:
    """Peak activation memory of one micro-batch: the tensors kept for backward plus the working set of the moment the
    peak happens (trl's LM head or one layer's backward)."""
    with_ckpt = _activation_phases(arch, adapter_, setup, checkpointing=True)
    without = _activation_phases(arch, adapter_, setup, checkpointing=False)
    peak, at, kept = with_ckpt if setup.checkpointing else without
    return Activations(peak, at, kept, with_ckpt[0], without[0])


def _activation_phases(arch: Architecture, adapter_: Adapter | None, setup: Setup, checkpointing: bool) -> tuple[int, str, int]:
    tokens = setup.micro_batch * setup.max_length
    wrapped = adapter_.wrapped if adapter_ else [()] * arch.layers
    per_layer = [layer_saved_bytes(arch, adapter_, set(names), setup) for names in wrapped]
    backward = max(layer_backward_bytes(arch, setup))
    head_saved, head_forward, head_backward = head_bytes(arch, setup, adapter_ is None)
    kept = model_saved_bytes(arch, setup) + head_saved
    if checkpointing:
        # without autocast the recomputed layer keeps its checkpointed input itself, not a copy
        shared_input = 0 if setup.norm_input_copy else tokens * arch.hidden * setup.weight_bytes
        inputs = arch.layers * tokens * arch.hidden * setup.weight_bytes  # each layer's input, kept by the checkpoint
        after_forward = inputs + kept
        phases = {
            "the LM head's backward": inputs + kept + head_backward,
            "the end of forward (LM head)": inputs + kept + head_forward,
            "a recomputed layer's backward": inputs + kept - head_saved + max(per_layer) - shared_input + backward,
        }
    else:
        layers = sum(per_layer)
        after_forward = layers + kept
        phases = {
            "the LM head's backward": layers + kept + head_backward,
            "the end of forward (LM head)": layers + kept + head_forward,
            "the last layer's backward": layers + kept - head_saved + backward,
        }
    at = max(phases, key=phases.get)
    return int(phases[at]), at, int(after_forward)


def layer_saved_bytes(arch: Architecture, adapter_: Adapter | None, wrapped: set, setup: Setup) -> int:
    """Bytes one layer keeps for backward at the config's micro-batch and length. Each term names the op that keeps
    it; the bytes follow the dtypes autocast (CUDA) or plain fp32 (CPU) give those tensors."""
    h, f, heads = arch.hidden, arch.inner, arch.heads
    tokens = setup.micro_batch * setup.max_length
    norms = 1 if arch.family == "gptj" else 2
    per_token = 8 * norms  # fp32 mean and rstd of each LayerNorm
    if setup.norm_input_copy:
        per_token += 4 * h * norms  # autocast runs layer_norm in fp32 on a copy of the bf16 input, and keeps the copy
    else:
        per_token += setup.weight_bytes * h  # the layer input, kept by the first LayerNorm
        if not arch.parallel_residual:
            per_token += setup.weight_bytes * h  # the second LayerNorm's input is a new sum (attention + residual)
    linear_part, scores_per_head_pair, mask_per_pair = attention_saved(arch, setup)
    per_token += linear_part
    act_saved, act_out = activation_function_bytes(arch.activation, setup)
    per_token += act_saved * f
    per_token += linear_inputs_saved(arch, adapter_, wrapped, setup, act_out)
    scores = (scores_per_head_pair * heads + mask_per_pair) * setup.micro_batch * setup.max_length**2
    rotary_tables = 16 * arch.rotary_dim * setup.max_length if arch.family == "gptj" else 0  # GPT-J: sin/cos per layer, fp32
    return int(per_token * tokens + scores + rotary_tables)


def attention_saved(arch: Architecture, setup: Setup) -> tuple[float, int, int]:
    """(bytes per token, per element of the b x heads x s x s scores, per element of a b x s x s mask) attention
    keeps for backward."""
    h, compute = arch.hidden, setup.compute_bytes
    if setup.attention in ("eager",):
        # GPT-Neo and GPT-J upcast query and key to fp32 before the matmul; autocast casts them back to bf16 copies
        qk_bytes = (compute if setup.autocast else 4) if arch.family in ("gpt_neo", "gptj") else compute
        # fp32 softmax output, plus its copy in the value's dtype when that is not fp32
        scores = 4 + (compute if compute != 4 else 0)
        return 2 * qk_bytes * h + compute * h, scores, 0
    # sdpa / flash-attention: query, key, value and the output kept, plus an fp32 logsumexp per head; no s x s scores.
    # NeoX's value is a view of the fused query_key_value output, so the whole 3*h output stays alive (the rotary
    # query and key are new tensors); with use_cache (never in training) the cache would copy the value instead.
    # A padded batch comes with a boolean mask, which sdpa turns into an additive one in the query's dtype, per layer;
    # GPT-Neo's layers (finetune.neo_attention) share one additive mask per layer type instead (model_saved_bytes).
    value = 3 * compute * h if arch.family == "gpt_neox" else compute * h
    return 2 * compute * h + value + compute * h + 4 * arch.heads, 0, 0 if arch.family == "gpt_neo" else compute


def activation_function_bytes(name: str, setup: Setup) -> tuple[int, int]:
    """(bytes kept per element of the MLP's inner width, bytes of the activation's output)."""
    compute = setup.compute_bytes
    if name == "gelu_new":  # 0.5*x*(1 + tanh(c*(x + 0.044715*x**3))): x (for pow), tanh, 1+tanh, 0.5*x
        if setup.autocast:
            return 4 + 4 + 4 + compute, 4  # autocast runs pow in fp32: the fp32 chain follows
        return 4 * compute, compute
    if name == "gelu_fast":  # 0.5*x*(1 + tanh(x*0.798*(1 + 0.044715*x*x))): seven intermediates kept
        return 7 * compute, compute
    return compute, compute  # torch's fused gelu (and relu/silu): keeps its input


def linear_inputs_saved(arch: Architecture, adapter_: Adapter | None, wrapped: set, setup: Setup, act_out: int) -> float:
    """Bytes per token the layer's Linears keep: a trainable weight needs its input; an adapter keeps its dropout's
    output and mask; a frozen Linear (bf16 or 4-bit) keeps nothing."""
    roles = LINEAR_INPUTS[arch.family]
    role_bytes = {"ln1": setup.norm_bytes, "ln2": setup.norm_bytes, "attn": setup.compute_bytes, "act": act_out}
    lora_bytes = adapter_bytes(setup)
    shared, per_token = {}, 0.0
    # GPT-Neo under SDPA (finetune.neo_attention): the kernels return the output in (b, s, heads, d) memory, so merging
    # the heads is a view and out_proj's input is the attention output attention_saved already counts.
    counted = {"attn"} if arch.family == "gpt_neo" and setup.attention != "eager" else set()
    for name, (fan_in, fan_out) in arch.layer_linears.items():
        role = roles[name]
        if adapter_ is None:  # full fine-tuning: every weight trains
            if setup.autocast and role_bytes[role] != setup.compute_bytes:
                per_token += setup.compute_bytes * fan_in  # each Linear keeps its own bf16 cast of an fp32 input
            elif role not in counted:
                shared[role] = role_bytes[role] * fan_in  # Linears reading the same tensor keep it once
        elif name in wrapped:
            if adapter_.dropout > 0:
                per_token += dropout_bytes(setup, lora_bytes) * fan_in
            elif setup.autocast:
                per_token += setup.compute_bytes * fan_in
            elif role_bytes[role] == lora_bytes:
                shared[role] = 0 if role in counted else role_bytes[role] * fan_in
            else:
                per_token += lora_bytes * fan_in  # peft casts the input to the adapter's dtype
            low_rank = setup.compute_bytes if setup.autocast else lora_bytes
            per_token += low_rank * adapter_.rank  # lora_B's input
            if adapter_.dora:
                per_token += 2 * low_rank * fan_out  # base and adapter outputs, kept for the magnitude's gradient
    return per_token + sum(shared.values())


def dropout_bytes(setup: Setup, lora_bytes: int) -> int:
    """Per element of an adapter's input: CUDA dropout keeps a 1-byte mask, CPU dropout a noise tensor in the input's
    dtype; lora_A keeps the dropped input (as autocast's bf16 copy under autocast)."""
    kept_input = setup.compute_bytes if setup.autocast else lora_bytes
    return (1 if setup.device == "cuda" else lora_bytes) + kept_input


def layer_backward_bytes(arch: Architecture, setup: Setup) -> tuple[int, int]:
    """Working set of one layer's backward: gradients of the MLP's widest tensors (3 of them, fp32 or compute dtype)
    and, for eager attention, the softmax backward's fp32 gradient in and out (plus the gradient of the scores'
    bf16 copy under autocast)."""
    tokens = setup.micro_batch * setup.max_length
    grad = max(setup.compute_bytes, 4 if setup.autocast else setup.compute_bytes)
    mlp = 3 * grad * arch.inner * tokens + 2 * setup.weight_bytes * arch.hidden * tokens
    score_grads = 2 * 4 + (setup.compute_bytes if setup.compute_bytes != 4 else 0)
    scores = score_grads * setup.micro_batch * arch.heads * setup.max_length**2 if setup.attention == "eager" else 0
    return mlp, scores + 2 * setup.weight_bytes * arch.hidden * tokens


def model_saved_bytes(arch: Architecture, setup: Setup) -> int:
    """Outside the layers: input ids, labels and mask (int64), the final LayerNorm's input and statistics, NeoX's
    rotary cos/sin, the attention mask transformers builds once per forward and GPT-Neo's two shared additive masks."""
    tokens = setup.micro_batch * setup.max_length
    final_norm = (4 if setup.norm_input_copy else setup.weight_bytes) * arch.hidden + 8
    rotary = 2 * arch.rotary_dim * setup.compute_bytes if arch.family == "gpt_neox" else 0
    mask = setup.micro_batch * setup.max_length**2 * (1 if setup.attention != "eager" else setup.weight_bytes)
    if arch.family == "gpt_neo" and setup.attention != "eager":  # one additive mask per layer type, shared (global, local)
        mask += 2 * setup.micro_batch * setup.max_length**2 * setup.compute_bytes
    return tokens * (24 + final_norm + rotary) + mask


def head_bytes(arch: Architecture, setup: Setup, full: bool) -> tuple[int, int, int]:
    """trl's fused LM head (trl.trainer.utils.add_fused_lm_head): (kept for backward, forward working set, backward
    working set). It projects 4096 tokens x 32768 vocabulary entries at a time; on CUDA a Triton kernel folds each tile
    in place, without Triton (CPU) torch keeps a few fp32 copies of the tile. The b x s x vocab logits never exist."""
    tokens = setup.micro_batch * setup.max_length
    rows, cols = min(tokens, HEAD_TILE_ROWS), min(arch.vocab, HEAD_TILE_COLS)
    buffer = rows * cols * setup.compute_bytes
    fp32_tile = rows * cols * 4
    forward_tiles, backward_tiles = HEAD_FALLBACK_TILES if setup.device == "cpu" else (0, 0)
    kept = tokens * arch.hidden * setup.norm_bytes  # the final norm's output rows, copied for the head
    chunk_cast = rows * arch.hidden * setup.compute_bytes if setup.norm_bytes != setup.compute_bytes else 0
    forward = buffer + chunk_cast + forward_tiles * fp32_tile
    backward = buffer + chunk_cast + backward_tiles * fp32_tile + tokens * arch.hidden * 4  # fp32 gradient of the rows
    if full:  # the head's weight gradient, accumulated in fp32 then cast to the weight's dtype
        backward += arch.vocab * arch.hidden * (4 + setup.weight_bytes)
        backward += HEAD_FALLBACK_WEIGHT_GRAD_TILES * fp32_tile if setup.device == "cpu" else 0
    return kept, forward, backward


# --- time ----------------------------------------------------------------------------------------------------------


def flops_per_token(arch: Architecture, adapter_: Adapter | None, setup: Setup) -> tuple[float, str]:
    """Executed FLOPs per training token, and the terms that make them up."""
    n, s, layers, h = arch.matmul_params, setup.max_length, arch.layers, arch.hidden
    attention = 12 * layers * s * h  # QK^T and AV: 4*L*s*h forward, twice that backward (no causal saving assumed)
    head = arch.vocab * h
    terms = []
    if adapter_ is None:
        total = 6 * n + attention
        terms.append(f"6N (N = {n / 1e9:.3g}B weights in matmuls)")
    else:
        total = 4 * n + 6 * adapter_.trainable + attention
        terms.append(f"2N forward + 2N backward through frozen weights (N = {n / 1e9:.3g}B) + 6 x {adapter_.trainable / 1e6:.3g}M adapter")
    terms.append(f"attention 12*L*s*h = {attention / 1e9:.3g} GFLOP")
    if setup.checkpointing:
        total += 2 * (n - head) + 4 * layers * s * h
        terms.append("+2N recompute (gradient checkpointing)")
    total += 2 * head
    terms.append("+2*V*h (trl's LM head recomputes its logits in backward)")
    return float(total), "; ".join(terms)


def peak_tflops(device: Gpu, setup: Setup) -> float | None:
    if setup.device == "cpu":
        return None
    if setup.autocast == "bfloat16" or (not setup.autocast and setup.weight_bytes == 2):
        return device.bf16_tflops or device.fp16_tflops
    if setup.autocast == "float16":
        return device.fp16_tflops
    return device.fp32_tflops


def run_length(resolved: dict, setup: Setup, num_gpus: int) -> tuple[int | None, int, str]:
    """(optimizer steps or None, tokens, how they were found) for the whole run."""
    trainer, data = resolved["trainer"], resolved["data"]
    rows_per_step = setup.micro_batch * setup.grad_accum * num_gpus
    max_steps = int(trainer_setting(trainer, "max_steps") or -1)
    if max_steps > 0:
        return max_steps, max_steps * rows_per_step * setup.max_length, f"trainer.max_steps={max_steps}"
    rows = None if setup.packing else count_rows(data["path"])
    if rows is None:
        why = "packed rows" if setup.packing else "the data is not a local file whose rows can be counted"
        return None, DEFAULT_TRAIN_TOKENS, f"per {DEFAULT_TRAIN_TOKENS // 10**6}M tokens ({why})"
    train_rows = rows if (data.get("eval_path") or data.get("eval_split")) else rows - round(rows * data["eval_fraction"])
    epochs = float(trainer_setting(trainer, "num_train_epochs"))
    micro_batches = math.ceil(train_rows / (setup.micro_batch * num_gpus))
    steps = math.ceil(epochs * max(1, math.ceil(micro_batches / setup.grad_accum)))
    basis = f"{epochs:g} epochs of {train_rows:,} rows, {steps} optimizer steps, every row padded to max_length (an upper bound"
    basis += "; data.packing=auto can only make fewer rows)" if data.get("packing") == "auto" else ")"
    return steps, steps * rows_per_step * setup.max_length, basis


def count_rows(path) -> int | None:
    """Rows of local .jsonl/.json/.csv/.tsv/.parquet files or globs of them (None for a Hub dataset, a dataset
    folder or anything unreadable)."""
    import glob

    total = 0
    for entry in path if isinstance(path, list) else [path]:
        expanded = str(Path(entry).expanduser())
        files = sorted(glob.glob(expanded, recursive=True)) if any(c in entry for c in "*?[") else [expanded]
        for name in files or [expanded]:
            rows = _file_rows(Path(name))
            if rows is None:
                return None
            total += rows
    return total


def _file_rows(path: Path) -> int | None:
    if not path.is_file():
        return None
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with path.open("rb") as handle:
            return sum(1 for line in handle if line.strip())
    if suffix in (".csv", ".tsv"):
        with path.open("rb") as handle:
            return max(0, sum(1 for line in handle if line.strip()) - 1)
    if suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        return len(data) if isinstance(data, list) else None
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    return None


# --- the plan ------------------------------------------------------------------------------------------------------


def plan_resolved(resolved: dict, device: Gpu, num_gpus: int, mfu: float, headroom: float, preset: str | None = None,
                  notes: list | None = None, suggest: bool = True) -> Plan:
    notes = list(notes or [])
    resolved = copy.deepcopy(resolved)
    if precision.resolve(resolved, bf16=device.key != "cpu" and device.bf16_tflops is not None):  # auto: by the target
        notes.append(f"precision auto on {device.name}: {precision.describe(resolved)}")
    arch = architecture(resolved["model"])
    adapter_ = adapter(resolved["model"], resolved["strategy"], arch)
    setup = setup_of(resolved, device)
    notes += setup_notes(arch, setup, device, num_gpus, resolved)
    lines, cpu_bytes = memory_lines(arch, adapter_, setup, num_gpus)
    acts = activations(arch, adapter_, setup)
    where = "gradient checkpointing on" if setup.checkpointing else "gradient checkpointing off"
    lines.insert(_after_optimizer(lines), MemoryLine(
        "activations", acts.peak, f"{setup.micro_batch} x {setup.max_length} tokens, {where}; peak at {acts.peak_at}"))
    total = sum(line.bytes for line in lines)
    capacity = int(device.memory_gib * GIB) if device.memory_gib else None
    usable = int(capacity * (1 - headroom)) if capacity else None
    flops, terms = flops_per_token(arch, adapter_, setup)
    peak = peak_tflops(device, setup)
    tokens_per_second = mfu * peak * 1e12 * num_gpus / flops if peak else None
    tokens_per_step = setup.micro_batch * setup.grad_accum * num_gpus * setup.max_length
    steps, run_tokens, basis = run_length(resolved, setup, num_gpus)
    result = Plan(
        preset=preset, gpu=device, num_gpus=num_gpus, model=resolved["model"]["name_or_path"], architecture_source=arch.source,
        family=arch.family, strategy=setup.strategy, total_params=arch.total_params + (adapter_.trainable if adapter_ else 0),
        trainable_params=adapter_.trainable if adapter_ else arch.total_params, micro_batch=setup.micro_batch,
        max_length=setup.max_length, grad_accum=setup.grad_accum, checkpointing=setup.checkpointing,
        precision=precision_name(setup), optimizer=setup.optimizer, distributed=distributed_name(setup), memory=lines,
        total_bytes=total, capacity_bytes=capacity, usable_bytes=usable, fits=(total <= usable) if usable else None,
        activations_without_checkpointing=acts.without_checkpointing, activations_with_checkpointing=acts.with_checkpointing,
        activation_peak_at=acts.peak_at, activations_kept_after_forward=acts.kept_after_forward, cpu_offload_bytes=cpu_bytes, flops_per_token=flops, flops_terms=terms,
        peak_tflops=peak, mfu=mfu, tokens_per_second=tokens_per_second, tokens_per_step=tokens_per_step,
        step_seconds=tokens_per_step / tokens_per_second if tokens_per_second else None, run_steps=steps,
        run_tokens=run_tokens, run_seconds=run_tokens / tokens_per_second if tokens_per_second else None,
        run_basis=basis, notes=notes,
    )
    if suggest and result.fits is False:
        result.suggestions = suggestions(resolved, device, num_gpus, mfu, headroom, setup)
    return result


def _after_optimizer(lines: list) -> int:
    return next(i for i, line in enumerate(lines) if line.name == "optimizer states") + 1


def precision_name(setup: Setup) -> str:
    weights = _dtype_name(setup.weight_bytes)
    if setup.autocast:
        return f"{weights} weights, {setup.autocast} autocast"
    return f"{weights} weights, no autocast"


def distributed_name(setup: Setup) -> str:
    if setup.backend == "deepspeed":
        offload = [k for k, on in (("optimizer", setup.offload_optimizer), ("params", setup.offload_params)) if on]
        return f"DeepSpeed ZeRO-{setup.zero_stage}" + (f" + CPU offload ({', '.join(offload)})" if offload else "")
    if setup.backend == "fsdp":
        shard = "full shard (planned like ZeRO-3)" if setup.zero_stage == 3 else "no reshard (planned like ZeRO-2)"
        return f"FSDP {shard}" + (" + CPU offload" if setup.offload_params else "")
    return setup.backend


def setup_notes(arch: Architecture, setup: Setup, device: Gpu, num_gpus: int, resolved: dict) -> list[str]:
    notes = []
    if setup.device == "cuda" and setup.autocast == "bfloat16" and device.bf16_tflops is None:
        notes.append(f"{device.name} has no bf16: trainer.bf16=true stops at start-up there; fp16 overflows on this family "
                     "(validate refuses it without allow_fp16=true); use an Ampere or newer GPU")
    if setup.device == "cpu" and (setup.autocast or setup.weight_bytes != 4):
        notes.append("CPU planning is validated for fp32 (model.dtype=float32 trainer.bf16=false) only")
    if setup.backend not in ("none", "ddp", "deepspeed", "fsdp"):
        notes.append(f"distributed.backend={setup.backend}: unknown to the planner, planned as replicated (DDP-like)")
    if setup.backend == "ddp" and num_gpus == 1:
        notes.append("distributed=ddp on one GPU: nothing to replicate; set num_gpus=N for the per-GPU plan of N processes")
    if setup.backend == "fsdp":
        notes.append("FSDP is planned like ZeRO: reshard_after_forward=true shards weights, gradients and optimizer state "
                     "over num_gpus (ZeRO-3), false keeps the weights whole (ZeRO-2); no fp32 master copy")
    if num_gpus > 1 and setup.backend == "none":
        notes.append(f"num_gpus={num_gpus} with distributed=none is plain DDP: every GPU holds everything; "
                     "distributed=zero2|zero3 shard the training state")
    if setup.offload_optimizer or setup.offload_params:
        notes.append("CPU offload: tokens/s is an upper bound; CPU Adam and PCIe transfers usually make steps several times slower")
    if setup.strategy == "qlora":
        notes.append("QLoRA: 4-bit Linears return their input's dtype; activations are planned as for LoRA on a bf16 base "
                     "(not measured); dequantization adds time the FLOPs do not show")
    if setup.strategy in ("dora",) or resolved["strategy"].get("use_dora"):
        notes.append("DoRA: the magnitude terms come from peft's code, not a measurement; steps run ~1.2-2x longer than "
                     "LoRA, which FLOPs do not show")
    if setup.strategy == "full" and setup.backend != "deepspeed" and setup.weight_bytes == 2:
        notes.append("full fine-tuning without DeepSpeed trains the bf16 weights directly (the Trainer keeps no fp32 master "
                     "copy): 8 B per parameter with AdamW, but small updates can be lost to bf16 rounding")
    model = resolved["model"]
    if not Path(model["name_or_path"]).expanduser().exists() and model.get("revision", "main") != "main":
        notes.append(f"model.revision={model['revision']}: the shipped config is the main branch's; the architecture is the same")
    if setup.packing:
        notes.append("data.packing=true: every row is a full max_length; the time is per 100M tokens")
    notes.append("activations assume every row is max_length tokens long (padding to the longest row of a batch can "
                 "only make them smaller)")
    logits = setup.micro_batch * setup.max_length * arch.vocab * (setup.compute_bytes + 4 + 4)
    notes.append(f"trl's fused LM head never builds the {setup.micro_batch} x {setup.max_length} x {arch.vocab} logits; "
                 f"a plain transformers loss would add about {_gib(logits)} GiB (logits, their fp32 copy and gradient)")
    return notes


# --- suggestions ---------------------------------------------------------------------------------------------------


def suggestions(resolved: dict, device: Gpu, num_gpus: int, mfu: float, headroom: float, setup: Setup) -> list[Suggestion]:
    """The changes that make a config fit, cheapest first: the same training with smaller micro-batches or
    recomputation, then a 4-bit base, more GPUs, CPU offload, and last shorter samples (which change the data).
    Of each kind only the first that fits is kept (the largest micro-batch, the fewest GPUs, the longest samples)."""
    found, settled = [], set()
    for kind, change, overrides, changed, gpus, note in candidate_changes(resolved, setup, num_gpus):
        if kind in settled:
            continue
        try:
            replanned = plan_resolved(changed, device, gpus, mfu, headroom, suggest=False)
        except ConfigError:
            continue
        found.append(Suggestion(change, overrides, gpus, replanned.total_bytes, bool(replanned.fits),
                                replanned.tokens_per_second, replanned.cpu_offload_bytes, note))
        if replanned.fits:
            settled.add(kind)
    fitting = [s for s in found if s.fits]
    return fitting or sorted(found, key=lambda s: s.total_bytes)[:3]


def candidate_changes(resolved: dict, setup: Setup, num_gpus: int):
    """(kind, description, overrides, changed config, num_gpus, note), in order of preference."""
    trainer = resolved["trainer"]
    micro, accum = setup.micro_batch, setup.grad_accum
    for batch in dict.fromkeys(b for b in (micro // 2, micro // 4, micro // 8, 1) if 1 <= b < micro and micro % b == 0):
        factor = micro // batch
        changed = _with(resolved, trainer={**trainer, "per_device_train_batch_size": batch,
                                           "gradient_accumulation_steps": accum * factor})
        yield ("micro-batch", f"micro-batch {batch} x {accum * factor} accumulation (same global batch)",
               [f"trainer.per_device_train_batch_size={batch}", f"trainer.gradient_accumulation_steps={accum * factor}"],
               changed, num_gpus, "")
    if not setup.checkpointing:
        changed = _with(resolved, trainer={**trainer, "gradient_checkpointing": True})
        yield ("checkpointing", "gradient checkpointing on", ["trainer.gradient_checkpointing=true"], changed, num_gpus,
               "~1/3 more compute")
        if micro > 1:
            changed = _with(changed, trainer={**changed["trainer"], "per_device_train_batch_size": 1,
                                              "gradient_accumulation_steps": accum * micro})
            yield ("checkpointing", f"gradient checkpointing + micro-batch 1 x {accum * micro}",
                   ["trainer.gradient_checkpointing=true", "trainer.per_device_train_batch_size=1",
                    f"trainer.gradient_accumulation_steps={accum * micro}"], changed, num_gpus, "")
    if setup.strategy in ("lora", "dora") and setup.device == "cuda":
        quantization = _group_file("strategy", "qlora").get("quantization")
        changed = _with(resolved, strategy={**resolved["strategy"], "name": "qlora", "quantization": quantization})
        yield "qlora", "QLoRA (4-bit NF4 base)", ["strategy=qlora"], changed, num_gpus, "needs bitsandbytes; slower per step"
    if setup.device == "cuda":
        sharded = resolved if setup.sharded else _with(resolved, distributed=_group_file("distributed", "zero3"))
        change = [] if setup.sharded else ["distributed=zero3"]
        name = distributed_name(setup) if setup.sharded else "DeepSpeed ZeRO-3"
        for gpus in (2, 4, 8, 16, 32, 64):
            if gpus > num_gpus:
                yield ("gpus", f"{name} on {gpus} GPUs", [*change, f"num_gpus={gpus}"], sharded, gpus,
                       f"accelerate launch --num_processes {gpus}")
    if setup.device == "cuda" and not (setup.offload_optimizer and setup.offload_params):
        yield ("offload", "DeepSpeed ZeRO-3 with optimizer and parameters offloaded to CPU", ["distributed=zero3_offload"],
               _with(resolved, distributed=_group_file("distributed", "zero3_offload")), num_gpus,
               "much slower: CPU Adam and PCIe bound")
    length = setup.max_length // 2
    while length >= MIN_MAX_LENGTH:
        changed = _with(resolved, data={**resolved["data"], "max_length": length})
        yield ("max_length", f"data.max_length={length}", [f"data.max_length={length}"], changed, num_gpus,
               "changes the data: longer rows are dropped or cut (data.overlength)")
        length //= 2


def _with(resolved: dict, **sections) -> dict:
    return {**resolved, **sections}


@functools.cache
def _group_file(group: str, name: str) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(CONF_DIR / group / f"{name}.yaml"), resolve=True)


# --- output --------------------------------------------------------------------------------------------------------


def render(p: Plan) -> str:
    where = f"{p.num_gpus} x {p.gpu.name}" if p.gpu.key != "cpu" else "CPU"
    memory = f", {_gib(p.capacity_bytes)} GiB" if p.capacity_bytes else ""
    peak = f", {_tflops(p.peak_tflops)} TFLOPs dense" if p.peak_tflops else ""
    out = [f"plan: {'conf=' + p.preset if p.preset else 'config'} on {where}{memory}{peak}",
           f"model: {p.model} ({p.family}; architecture from {p.architecture_source}): {p.total_params:,} parameters",
           f"strategy: {p.strategy}: {p.trainable_params:,} trainable ({p.trainable_params / p.total_params:.2%})",
           (f"batch: {p.micro_batch} x {p.max_length} tokens per micro-batch, {p.grad_accum} accumulation steps x {p.num_gpus} "
            f"GPU(s) = {p.tokens_per_step:,} tokens per optimizer step; gradient checkpointing "
            f"{'on' if p.checkpointing else 'off'}; {p.precision}; optimizer {p.optimizer}; distributed: {p.distributed}"),
           "", f"memory per {'GPU' if p.gpu.key != 'cpu' else 'process'}{'':<29}GiB"]
    for line in p.memory:
        out.append(f"  {line.name:<34}{_gib(line.bytes):>8}   {line.detail}")
    out.append(f"  {'total':<34}{_gib(p.total_bytes):>8}   " + verdict(p))
    other = p.activations_without_checkpointing if p.checkpointing else p.activations_with_checkpointing
    out.append(f"  (activations {'without' if p.checkpointing else 'with'} gradient checkpointing: {_gib(other)} GiB)")
    if p.cpu_offload_bytes:
        out.append(f"  CPU RAM for offloaded state: {_gib(p.cpu_offload_bytes)} GiB per GPU (x GPUs per node)")
    out += ["", "time"]
    out.append(f"  FLOPs per token: {p.flops_per_token:.3g} ({p.flops_terms})")
    if p.tokens_per_second:
        out.append(f"  at {p.mfu:.0%} of {_tflops(p.peak_tflops)} TFLOPs x {p.num_gpus}: {p.tokens_per_second:,.0f} tokens/s; "
                   f"{_duration(p.step_seconds)} per optimizer step")
        out.append(f"  run: {_duration(p.run_seconds)} " + (p.run_basis if p.run_steps is None else f"({p.run_basis})"))
    else:
        out.append("  tokens/s: not estimated on CPU")
    if p.suggestions:
        out += ["", "to make it fit (each re-planned; cheapest first):"]
        for s in p.suggestions:
            bound = "at most " if s.cpu_offload_bytes else ""
            speed = f", {bound}{s.tokens_per_second:,.0f} tokens/s" if s.tokens_per_second else ""
            speed += f", {_gib(s.cpu_offload_bytes)} GiB of CPU RAM per GPU" if s.cpu_offload_bytes else ""
            mark = "fits" if s.fits else "still too large"
            note = f"  [{s.note}]" if s.note else ""
            out.append(f"  - {s.change}: {_gib(s.total_bytes)} GiB per GPU, {mark}{speed}{note}")
            out.append(f"      {' '.join(s.overrides)}")
    if p.notes:
        out += ["", "notes:"] + [f"  - {n}" for n in p.notes]
    return "\n".join(out)


def verdict(p: Plan) -> str:
    if p.fits is None:
        return "(CPU: compare with the free RAM)"
    limit = f"of {_gib(p.capacity_bytes)} GiB (limit {_gib(p.usable_bytes)} with {1 - p.usable_bytes / p.capacity_bytes:.0%} headroom)"
    return f"{limit}: {'fits' if p.fits else 'does NOT fit'}"


def as_json(p: Plan) -> dict:
    data = dataclasses.asdict(p)
    data["total_gib"] = round(p.total_bytes / GIB, 2)
    return data


def summary(p: Plan) -> str:
    """The one-line result the preset headers carry."""
    shape = f"{p.micro_batch} x {p.max_length}"
    if p.gpu.key == "cpu":
        return f"{_gib(p.total_bytes)} GiB of RAM at {shape}; time not estimated on CPU"
    fit = "fits" if p.fits else "does not fit"
    speed = f"; ~{_round_speed(p.tokens_per_second):,} tokens/s at {p.mfu:.0%} MFU" if p.tokens_per_second else ""
    return f"{_gib(p.total_bytes)} GiB of {_gib(p.capacity_bytes)} GiB per GPU at {shape}, {fit}{speed}"


def _round_speed(value: float) -> int:
    digits = max(0, int(math.log10(value)) - 1) if value >= 100 else 0
    return int(round(value, -digits))


def _gib(value: int | None) -> str:
    return "-" if value is None else f"{value / GIB:.1f}"


def _gib_or_dash(value: float | None) -> str:
    return "-" if value is None else f"{value:g} GiB"


def _tflops(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def _dtype_name(nbytes: int) -> str:
    return {4: "fp32", 2: "bf16"}.get(nbytes, f"{nbytes} B")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _shard_note(shards: int) -> str:
    return f", sharded over {shards} GPUs" if shards > 1 else ""


# --- preset headers ------------------------------------------------------------------------------------------------

HEADER = re.compile(r"^# plan \(python -m finetune\.plan (?P<args>[^)]*)\): (?P<result>.*)$")


def preset_files() -> list[Path]:
    return sorted(p for p in CONF_DIR.glob("*.yaml") if p.stem != "config")


def recipe_files() -> list[Path]:
    """Recipe READMEs and scripts: their `# plan (...)` lines (anywhere, any preset) are kept in sync too."""
    recipes = CONF_DIR.parent / "recipes"
    return sorted(p for p in recipes.rglob("*") if p.suffix in (".md", ".sbatch", ".sh"))


def header_line(path: Path) -> tuple[int, re.Match] | None:
    """(index, match) of the `# plan (...)` line in the leading comment block of a preset."""
    for index, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if not line.startswith("#"):
            return None
        found = HEADER.match(line)
        if found:
            return index, found
    return None


def expected_header(args: str) -> str:
    """The header line a preset should carry for the planner command in it."""
    parts = args.split()
    preset, options, overrides = parse_args(parts)
    result = plan_preset(preset, overrides, **options)
    return f"# plan (python -m finetune.plan {args}): {summary(result)}"


def sync_headers(write: bool) -> list[str]:
    """Recompute every preset's header line and every plan line of the recipes; rewrite stale ones when `write`.
    Returns one message per stale or missing line (after writing: per rewritten line)."""
    messages, lines_of = [], {}
    for path in preset_files():
        found = header_line(path)
        if found is None:
            messages.append(f"{path.name}: no `# plan (python -m finetune.plan conf={path.stem} gpu=... num_gpus=...)` line "
                            "in its leading comments; add one, then run python -m finetune.plan --sync-headers")
        elif f"conf={path.stem}" not in found[1].group("args").split():
            messages.append(f"{path.name}: its plan line must name conf={path.stem}")
        else:
            lines_of[path] = [found]
    for path in recipe_files():
        found = [(i, m) for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()) if (m := HEADER.match(line))]
        if found:
            lines_of[path] = found
    for path, found in lines_of.items():
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        stale = 0
        for index, match in found:
            wanted = expected_header(match.group("args"))
            if lines[index].rstrip("\n") != wanted:
                messages.append(f"{path.relative_to(CONF_DIR.parent)}:{index + 1}: {'rewrote' if write else 'stale'}: {wanted}")
                lines[index] = wanted + "\n"
                stale += 1
        if write and stale:
            path.write_text("".join(lines), encoding="utf-8")
    return messages


if __name__ == "__main__":
    main()
