"""A model's architecture without its weights: its config.json (a local checkpoint folder's, the tiny builder's recipe,
or the copy shipped in finetune/models/model_configs/ for a Hub id: the planner never contacts the Hub), and the
facts the memory model needs, counted on the meta device (finetune.models.load.meta_model); an adapter's trainable
parameters from peft applied to that meta model."""

from __future__ import annotations

import functools
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from finetune.config.compose import PACKAGE_DIR
from finetune.errors import ConfigError

MODEL_CONFIGS_DIR = PACKAGE_DIR / "models" / "model_configs"

# Which tensor feeds each Linear of a layer: the first/second LayerNorm's output, the attention output, the MLP
# activation. Decides what a trainable layer or an adapter keeps for backward, and which inputs are shared.
LINEAR_INPUTS = {
    "gpt_neo": {"q_proj": "ln1", "k_proj": "ln1", "v_proj": "ln1", "out_proj": "attn", "c_fc": "ln2", "c_proj": "act"},
    "gptj": {"q_proj": "ln1", "k_proj": "ln1", "v_proj": "ln1", "out_proj": "attn", "fc_in": "ln1", "fc_out": "act"},
    "gpt_neox": {"query_key_value": "ln1", "dense": "attn", "dense_h_to_4h": "ln2", "dense_4h_to_h": "act"},
}


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


def shipped_config_path(model: dict) -> Path | None:
    """finetune/models/model_configs/<hub id, / as __>.json for the model's Hub id (case-insensitive), if shipped."""
    hub_id = model.get("hub_id") or model.get("name_or_path") or ""
    wanted = hub_id.replace("/", "__").lower() + ".json"
    return next((p for p in MODEL_CONFIGS_DIR.glob("*.json") if p.name.lower() == wanted), None)


def no_architecture_problem(model: dict) -> str:
    known = ", ".join(sorted(p.stem.replace("__", "/") for p in MODEL_CONFIGS_DIR.glob("*.json")))
    return (
        f"model.name_or_path: no architecture for '{model['name_or_path']}': not a local folder with config.json and "
        f"not one of the Hub models shipped in finetune/models/model_configs/ ({known}); set model.name_or_path=DIR "
        "to a checkpoint folder (its config.json is enough)"
    )


def architecture_config(model: dict):
    """(transformers config, where it came from): a local folder's config.json or the tiny recipe, read as training
    reads them (finetune.models.load.architecture_config), else the copy shipped for the model's Hub id."""
    from transformers import AutoConfig

    from finetune.models import load, tiny

    path = Path(model["name_or_path"]).expanduser()
    if (path / "config.json").is_file() or model.get("tiny"):
        config = load.architecture_config(SimpleNamespace(**{"revision": None, "trust_remote_code": False, **model}))
        recipe = model.get("tiny") and not tiny.is_current(model["tiny"], path)  # not built yet, or to be rebuilt
        where = f"the tiny {model['tiny']} recipe (finetune.models.tiny)" if recipe else f"{path / 'config.json'}"
        return config, where
    shipped = shipped_config_path(model)
    if shipped is None:
        raise ConfigError(no_architecture_problem(model))
    return AutoConfig.from_pretrained(str(shipped)), f"finetune/models/model_configs/{shipped.name}"


def architecture(model: dict) -> Architecture:
    config, source = architecture_config(model)
    return _architecture(config.to_json_string(), source, model["family"])


@functools.lru_cache(maxsize=32)
def _architecture(config_json: str, source: str, family: str) -> Architecture:
    from torch import nn
    from transformers import AutoConfig

    from finetune.models.load import meta_model

    config = _config_from_json(config_json, AutoConfig)
    model = meta_model(config)
    layers = _layers(model)
    linears = {
        name.rsplit(".", 1)[-1]: (m.in_features, m.out_features)
        for name, m in layers[0].named_modules()
        if isinstance(m, nn.Linear)
    }
    unknown = sorted(set(linears) - set(LINEAR_INPUTS.get(family, {})))
    if family not in LINEAR_INPUTS or unknown:
        raise ConfigError(
            f"model.family: the planner knows the layers of {', '.join(LINEAR_INPUTS)}; {family} has "
            f"Linears it cannot place ({', '.join(unknown)})"
        )
    input_embeddings = model.get_input_embeddings()
    output = model.get_output_embeddings()
    tied = output is not None and output.weight is input_embeddings.weight
    embeddings = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Embedding))
    head_dim = config.hidden_size // config.num_attention_heads
    rotary = (
        getattr(config, "rotary_dim", None) or int(head_dim * _partial_rotary(config)) if family != "gpt_neo" else 0
    )
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
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer
    from transformers import AutoConfig

    from finetune.models.load import meta_model

    lora = json.loads(lora_json)
    base = meta_model(_config_from_json(config_json, AutoConfig))
    # low_cpu_mem_usage: peft creates the adapter weights on the meta device too (and fast, outside the device context).
    # peft 0.21 reads transformers' deprecated is_gradient_checkpointing: its FutureWarning is not the user's business.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\.")
        model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", **lora), low_cpu_mem_usage=True)
    layers = _layers(model.get_base_model())
    wrapped = tuple(
        tuple(sorted(name.rsplit(".", 1)[-1] for name, m in layer.named_modules() if isinstance(m, LoraLayer)))
        for layer in layers
    )
    return Adapter(
        trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
        wrapped=wrapped,
        rank=int(lora.get("r", 8)),
        dropout=float(lora.get("lora_dropout", 0.0)),
        dora=bool(lora.get("use_dora")),
    )
