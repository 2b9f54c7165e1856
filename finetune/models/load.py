"""Load the base model and tokenizer with this family's rules; read architecture facts without loading weights.

Family rules that the libraries leave to the user:
- GPT-Neo and GPT-J have no pad token. We pad with EOS and mask padding by sequence length (see finetune.data),
  so the real EOS at the end of each response keeps its label. Adding a new pad token would resize the embedding
  and force the embedding matrix into the adapter.
- NeoX and Pythia ship `<|padding|>` (id 1): use it.
- GPT-Neo's flash-attention-2 path ignores the local window of the local layers (transformers 5.23, code read):
  beyond 256 tokens it computes a different model, so it is refused. transformers gives GPT-Neo no SDPA path;
  finetune.neo_attention registers one in transformers' GPT-Neo dispatch table, and `attn_implementation=sdpa`
  (the default) loads the model with it.
  GPT-J has no SDPA path.
"""

from __future__ import annotations

from pathlib import Path

from finetune.models import tiny

DTYPES = ("auto", "bfloat16", "float32", "float16")  # auto: finetune.precision picks per machine
MODEL_TYPES = {"gpt_neo": "gpt_neo", "gpt_neox": "gpt_neox", "gptj": "gptj"}  # family -> config.model_type
ATTENTION = {
    "gpt_neo": ("sdpa", "eager"),  # sdpa: finetune.neo_attention (window and packing kept)
    "gptj": ("eager", "flash_attention_2"),
    "gpt_neox": ("eager", "sdpa", "flash_attention_2", "flex_attention"),
}
OUTPUT_EMBEDDINGS = ("lm_head", "embed_out", "wte", "embed_in")  # never wrapped by LoRA
TINY_ARCH = {"neo": "gpt_neo", "neox": "gpt_neox", "gptj": "gptj"}


def ensure_available(model_cfg) -> None:
    """Build the tiny checkpoint a `tiny:` model config asks for, once (under a file lock: the ranks of a distributed
    launch all get here, one builds and the others then find it built)."""
    if model_cfg.tiny:
        import fcntl

        out = Path(model_cfg.name_or_path).expanduser()
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out.parent / f".{out.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            tiny.ensure(model_cfg.tiny, out)


def architecture_config(model_cfg):
    """The model's config (no weights): from the checkpoint, the Hub, or the tiny builder's recipe."""
    from transformers import AutoConfig

    path = Path(model_cfg.name_or_path).expanduser()
    if model_cfg.tiny and not tiny.is_current(model_cfg.tiny, path):
        return tiny.model_config(model_cfg.tiny)  # what ensure_available() will build (a stale cache is rebuilt)
    return AutoConfig.from_pretrained(
        str(path) if path.exists() else model_cfg.name_or_path,
        revision=model_cfg.revision,
        trust_remote_code=model_cfg.trust_remote_code,
    )


def meta_model(config):
    """The causal LM a transformers config describes, built on the meta device: every module and parameter shape, no
    memory and no weights. Validation, the planner and anything else that reads an architecture build it here."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def linear_module_names(config) -> set[str]:
    """Leaf names of every nn.Linear in the architecture, found on the meta device (no memory, no weights)."""
    import torch

    model = meta_model(config)
    return {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}


def load_tokenizer(model_cfg):
    """The checkpoint's tokenizer with the family's pad policy applied (right padding for training)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        _source(model_cfg), revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code
    )
    if model_cfg.pad_token:
        if model_cfg.pad_token not in tokenizer.get_vocab():
            from finetune.errors import ConfigError

            raise ConfigError(
                f"model.pad_token: '{model_cfg.pad_token}' is not in the tokenizer of {model_cfg.name_or_path}; set "
                "model.pad_token=null"
            )
        tokenizer.pad_token = model_cfg.pad_token
    else:
        tokenizer.pad_token = tokenizer.eos_token  # safe: labels of padding come from lengths, not token ids
    tokenizer.padding_side = "right"
    return tokenizer


def load_model(model_cfg, tokenizer, quantization: dict | None = None):
    """Load weights (safetensors only) in the configured dtype and attention implementation."""
    import torch
    from transformers import AutoModelForCausalLM

    from finetune.models.activations import fuse_gelu

    kwargs = {"quantization_config": bnb_config(quantization)} if quantization else {}
    if model_cfg.family == "gpt_neo":
        from finetune.models import neo_attention  # noqa: F401 - registers GPT-Neo's "sdpa" with transformers

    model = AutoModelForCausalLM.from_pretrained(
        _source(model_cfg),
        revision=model_cfg.revision,
        dtype=getattr(torch, model_cfg.dtype),
        attn_implementation=model_cfg.attn_implementation,
        trust_remote_code=model_cfg.trust_remote_code,
        use_safetensors=True,  # never unpickle weights
        **kwargs,
    )
    fuse_gelu(model)  # GPT-Neo / GPT-J: gelu_new in one kernel (finetune.models.activations)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def bnb_config(quantization: dict):
    """A transformers.BitsAndBytesConfig from the kwargs a run records (strategy.quantization: dtype names as
    strings, as YAML and JSON hold them). Training (QLoRA), generate and the server all build it here."""
    import torch
    from transformers import BitsAndBytesConfig

    compute = quantization.get("bnb_4bit_compute_dtype") or "bfloat16"
    return BitsAndBytesConfig(**{**quantization, "bnb_4bit_compute_dtype": getattr(torch, compute)})


def local_path(model_cfg) -> Path | None:
    """The base's folder when name_or_path is a local directory (None for a Hub id)."""
    path = Path(model_cfg.name_or_path).expanduser()
    return path.resolve() if path.is_dir() else None


def hub_id(model_cfg) -> str | None:
    """The base's Hub id: model.hub_id, else name_or_path when that is not a local folder (None for a local-only
    base)."""
    if model_cfg.get("hub_id"):
        return model_cfg.hub_id
    return None if Path(model_cfg.name_or_path).expanduser().exists() else model_cfg.name_or_path


def _source(model_cfg) -> str:
    path = Path(model_cfg.name_or_path).expanduser()
    return str(path) if path.exists() else model_cfg.name_or_path
