"""GGUF export of GPT-NeoX / Pythia models for llama.cpp (and Ollama), and the llama.cpp runtime the gate asks.

Only GPT-NeoX: llama.cpp has a graph for GPT-NeoX/Pythia and none for GPT-Neo or GPT-J. The file is written by the
gguf package's own GGUFWriter, with its GPTNEOX architecture and tensor-name tables; what the tensors mean follows
llama.cpp's converter (convert_hf_to_gguf.py, class GPTNeoXModel): the fused query_key_value is reordered from
NeoX's per-head [q, k, v] interleave to llama.cpp's [all q, all k, all v], the rotary dimension count is
partial_rotary_factor (rotary_pct) x head_dim, norms and biases stay float32, and a 2-D weight whose rows do not
split into quantization blocks falls back to float16.

The tokenizer goes into the file as llama.cpp's "gpt2" BPE vocabulary: tokens (padded with unused [PADi] entries to
the embedding's row count), token types (added special tokens CONTROL, other added tokens USER_DEFINED), merges,
special-token ids, the pre-tokenizer, no BOS/EOS added (training rendered every special token through its template)
and the training chat template.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from finetune.export.runtime import Runtime

FAMILIES = ("gpt_neox",)
QUANTS = {
    "f32": "every tensor float32: full precision, the same greedy tokens as transformers in float32",
    "f16": "2-D weights float16, norms and biases float32: half the size, top-1 almost always unchanged",
    "bf16": "2-D weights bfloat16, norms and biases float32: half the size, bf16-trained weights kept as trained",
    "q8_0": "2-D weights 8-bit in blocks of 32 with a float16 scale, norms and biases float32: ~27% of f32",
}
FULL = "f32"

_TYPES = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
_SKIPPED = (".attention.masked_bias", ".attention.bias", ".rotary_emb.inv_freq")  # buffers older checkpoints saved
_GELU = ("gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh")  # llama.cpp's NeoX FFN applies ggml_gelu
_ROPE_TYPES = ("default", "linear")
_FILE = "model-{quant}.gguf"


@dataclass(frozen=True)
class _Tensor:
    """One tensor of the file: its GGUF name, where its data is in the model folder, and how it is stored."""

    name: str
    source: str
    shard: Path
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType

    @property
    def nbytes(self) -> int:
        return int(np.prod(gguf.quant_shape_to_byte_shape(self.shape, self.qtype)))


def write(model_dir: Path, out_dir: Path, quant: str, chat_template: str | None) -> list[Path]:
    """Write `out_dir`/model-<quant>.gguf from the transformers folder `model_dir` (safetensors, one file or shards).

    Streams: tensor infos are planned from the safetensors headers, then each tensor is read, converted and written
    on its own, so peak memory is about 2.5 float32 copies of the largest tensor (the 50k-row embedding or LM head:
    ~3 GB for NeoX-20B), not the model.
    """
    from safetensors import safe_open
    from transformers import AutoConfig

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if quant not in QUANTS:
        raise ValueError(f"GGUF quant {quant!r}: choose one of {', '.join(QUANTS)}")
    config = AutoConfig.from_pretrained(model_dir)
    _check_config(config, model_dir)
    qtype, ftype = _TYPES[quant]
    plan = _plan(model_dir, config, qtype)
    n_vocab = next(t.shape[0] for t in plan if t.name == "token_embd.weight")

    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GPTNEOX])
    _add_hparams(writer, config, model_dir.name, ftype)
    _add_vocab(writer, model_dir, n_vocab, chat_template)
    for tensor in plan:
        writer.add_tensor_info(tensor.name, tensor.shape, np.dtype(np.float32), tensor.nbytes, raw_dtype=tensor.qtype)
    path = out_dir / _FILE.format(quant=quant)
    head_dim = config.hidden_size // config.num_attention_heads
    try:
        writer.write_header_to_file(path=path)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with ExitStack() as stack:
            shards = {s: stack.enter_context(safe_open(s, framework="pt")) for s in {t.shard for t in plan}}
            for tensor in plan:
                data = shards[tensor.shard].get_tensor(tensor.source).float().numpy()
                data = _neox_to_llama(tensor.source, data, config.num_attention_heads, head_dim)
                writer.write_tensor_data(gguf.quants.quantize(data, tensor.qtype))
                del data  # freed before the next tensor is read: one tensor in memory at a time
    except BaseException:
        writer.close()
        path.unlink(missing_ok=True)  # never leave a truncated file a runtime would half-load
        raise
    writer.close()
    return [path]


def load(out_dir: Path, threads: int | None = None) -> Runtime:
    """The GGUF file in `out_dir` loaded in llama.cpp (through llama-cpp-python)."""
    files = sorted(Path(out_dir).glob(_FILE.format(quant="*")))
    if len(files) != 1:
        raise FileNotFoundError(f"{out_dir}: expected one {_FILE.format(quant='<quant>')}, found {len(files)}")
    return LlamaCpp(files[0], threads)


def _check_config(config, model_dir: Path) -> None:
    """Refuse what llama.cpp's GPT-NeoX graph would run differently from transformers, before anything is written."""
    if config.model_type not in FAMILIES:
        raise ValueError(
            f"{model_dir}: GGUF export supports {', '.join(FAMILIES)} (GPT-NeoX, Pythia) and this is a "
            f"{config.model_type} model: llama.cpp has no runtime for GPT-Neo or GPT-J"
        )
    if config.hidden_act not in _GELU:
        raise ValueError(f"{model_dir}: hidden_act={config.hidden_act!r}; llama.cpp's GPT-NeoX runs GELU only")
    if not getattr(config, "attention_bias", True):
        raise ValueError(f"{model_dir}: attention_bias=false; llama.cpp's GPT-NeoX needs the attention biases")
    rope_type = config.rope_parameters.get("rope_type", "default")
    if rope_type not in _ROPE_TYPES:
        raise ValueError(f"{model_dir}: rope_type={rope_type!r}; GGUF export maps {', '.join(_ROPE_TYPES)} only")


def _plan(model_dir: Path, config, qtype: gguf.GGMLQuantizationType) -> list[_Tensor]:
    """Every tensor the file holds, in file order, from the safetensors headers only (no weights are read)."""
    from safetensors import safe_open

    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    elif (model_dir / "model.safetensors").is_file():
        with safe_open(model_dir / "model.safetensors", framework="pt") as f:
            weight_map = dict.fromkeys(f.keys(), "model.safetensors")
    else:
        raise ValueError(f"{model_dir}: no model.safetensors or model.safetensors.index.json (GGUF export reads those)")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPTNEOX, config.num_hidden_layers)
    plan: list[_Tensor] = []
    for shard_name in dict.fromkeys(weight_map.values()):
        shard = model_dir / shard_name
        with safe_open(shard, framework="pt") as f:
            for source in (s for s, where in weight_map.items() if where == shard_name):
                if source.endswith(_SKIPPED):
                    continue
                name = names.get_name(source, try_suffixes=(".weight", ".bias"))
                if name is None:
                    raise ValueError(f"{model_dir}: tensor {source} has no GGUF name in llama.cpp's GPT-NeoX layout")
                shape = tuple(f.get_slice(source).get_shape())
                plan.append(_Tensor(name, source, shard, shape, _storage(name, shape, qtype)))
    if not any(t.name == "output.weight" for t in plan):
        if not config.tie_word_embeddings:
            raise ValueError(f"{model_dir}: no embed_out.weight (the LM head) and tie_word_embeddings is false")
        embedding = next(t for t in plan if t.name == "token_embd.weight")  # llama.cpp's NeoX needs its own output
        plan.append(_Tensor("output.weight", embedding.source, embedding.shard, embedding.shape, embedding.qtype))
    return plan


def _storage(name: str, shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType) -> gguf.GGMLQuantizationType:
    """The converter's rule: 1-D tensors, norms and biases float32; 2-D weights `qtype`, float16 when their rows do
    not split into `qtype`'s blocks."""
    if len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return gguf.GGMLQuantizationType.F32
    if shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        return gguf.GGMLQuantizationType.F16
    return qtype


def _neox_to_llama(source: str, data: np.ndarray, n_head: int, head_dim: int) -> np.ndarray:
    """query_key_value rows go from NeoX's per-head [q, k, v] to llama.cpp's [q of all heads, k..., v...]."""
    if ".attention.query_key_value." not in source:
        return data
    fused = data.reshape(n_head, 3, head_dim, *data.shape[1:])
    return np.ascontiguousarray(fused.swapaxes(0, 1)).reshape(data.shape)


def _add_hparams(writer: gguf.GGUFWriter, config, name: str, ftype: gguf.LlamaFileType) -> None:
    """The GPT-NeoX hyperparameters llama.cpp reads (llama_model_gptneox::load_arch_hparams and the common ones)."""
    rope = config.rope_parameters
    head_dim = config.hidden_size // config.num_attention_heads
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_rope_dimension_count(int(rope.get("partial_rotary_factor", 1.0) * head_dim))
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_parallel_residual(bool(config.use_parallel_residual))
    writer.add_layer_norm_eps(float(config.layer_norm_eps))
    writer.add_file_type(ftype)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_vocab(writer: gguf.GGUFWriter, model_dir: Path, n_vocab: int, chat_template: str | None) -> None:
    """The tokenizer as llama.cpp's gpt2 BPE vocabulary, as the converter's get_vocab_base/_set_vocab_gpt2 write it."""
    from transformers import AutoTokenizer

    pre = _pre_tokenizer(model_dir / "tokenizer.json")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= n_vocab:
        raise ValueError(f"{model_dir}: tokenizer ids reach {max(vocab.values())}, the embedding has {n_vocab} rows")
    by_id = {i: token for token, i in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens: list[str] = []
    types: list[gguf.TokenType] = []
    for i in range(n_vocab):
        token = by_id.get(i)
        if token is None:  # embedding rows past the tokenizer (Pythia pads 50,277 tokens to 50,304 rows)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        if i in added:
            if not added[i].normalized:  # llama.cpp takes added tokens as already normalized text
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            special = added[i].special or (token.startswith("<|") and token.endswith("|>"))
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=n_vocab)
    if not special.merges:
        raise ValueError(f"{model_dir}: no BPE merges in tokenizer.json or merges.txt")
    special.add_special_token = {"bos": False, "eos": False}  # templates write every special token themselves
    special.chat_template = chat_template
    special.add_to_gguf(writer, quiet=True)


def _pre_tokenizer(path: Path) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer: byte-level BPE with GPT-2's split regex and no prefix
    space is "gpt-2" (GPT-NeoX's NFC normalizer is accepted: llama.cpp skips it, the same ids on NFC text)."""
    if not path.is_file():
        raise ValueError(f"{path}: not found; GGUF export reads the fast tokenizer's tokenizer.json")
    spec = json.loads(path.read_text(encoding="utf-8"))
    pre, normalizer, model = spec.get("pre_tokenizer") or {}, spec.get("normalizer"), spec.get("model") or {}
    if (
        model.get("type") == "BPE"
        and pre.get("type") == "ByteLevel"
        and pre.get("use_regex", True)
        and not pre.get("add_prefix_space", False)
        and (normalizer is None or normalizer.get("type") == "NFC")
    ):
        return "gpt-2"
    raise ValueError(
        f"{path}: {model.get('type')} model, pre_tokenizer {json.dumps(pre)}, normalizer {json.dumps(normalizer)}: "
        "no llama.cpp pre-tokenizer is known to match it (GGUF export maps byte-level BPE with GPT-2's regex and "
        "no prefix space to llama.cpp's 'gpt-2')"
    )


class LlamaCpp:
    """A GGUF file in llama.cpp: logits from one eval, greedy decoding through llama.cpp's own KV cache.

    The KV cache is float32 (llama.cpp's default is float16), so an f32 file is compared with transformers at
    float32 throughout and what differs is the export, not the cache.
    """

    engine = "llama.cpp"

    def __init__(self, path: Path, threads: int | None = None):
        import llama_cpp

        self._llm = llama_cpp.Llama(
            model_path=str(path),
            n_ctx=0,  # the model's training context
            logits_all=True,
            verbose=False,
            n_threads=threads,
            n_threads_batch=threads,
            type_k=llama_cpp.GGML_TYPE_F32,
            type_v=llama_cpp.GGML_TYPE_F32,
        )

    def logits(self, ids) -> np.ndarray:
        self._evaluate(ids, 0)
        return np.array(self._llm.scores[: len(ids)], dtype=np.float32)

    def greedy(self, ids, n: int) -> list[int]:
        self._evaluate(ids, n)
        out: list[int] = []
        while len(out) < n:
            out.append(int(np.argmax(self._llm.scores[self._llm.n_tokens - 1])))
            if len(out) < n:
                self._llm.eval(out[-1:])
        return out

    def tokenize(self, text: str) -> list[int]:
        return self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def close(self) -> None:
        self._llm.close()

    def _evaluate(self, ids, n_new: int) -> None:
        """A fresh sequence: the KV cache is cleared, then `ids` are evaluated in one call."""
        ids = [int(i) for i in ids]
        if not ids or len(ids) + n_new > self._llm.n_ctx():
            raise ValueError(f"{len(ids)} prompt + {n_new} new tokens: need 1 to {self._llm.n_ctx()} in all")
        self._llm.reset()
        self._llm.eval(ids)
