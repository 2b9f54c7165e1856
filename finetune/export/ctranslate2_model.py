"""CTranslate2 export of GPT-J and GPT-NeoX/Pythia models: CTranslate2's own converter (with the fixes its GPT-J and
GPT-NeoX loaders need under transformers 5, see _Converter) and the Runtime the gate loads the result in, a
ctranslate2.Generator on CPU. CTranslate2 has no GPT-Neo loader (its local attention window has no equivalent there).

The folder is usable by itself: model.bin, config.json and vocabulary.json (CTranslate2's), plus the training
tokenizer with its chat template, which CTranslate2 users load with transformers or tokenizers (CTranslate2 takes
token strings and ids, never text).
"""

from __future__ import annotations

import gc
import json
import struct
from collections.abc import Sequence
from pathlib import Path

import ctranslate2
import numpy as np
from ctranslate2.converters import TransformersConverter

FAMILIES = ("gptj", "gpt_neox")
QUANTS = {
    "float32": "full precision, compared exactly with transformers",
    "float16": "16-bit weights; float16 compute on CUDA, float32 on CPU",
    "bfloat16": "16-bit brain-float weights; bfloat16 compute on recent GPUs, float32 on CPU",
    "int8": "8-bit weights, float32 elsewhere (int8_float32): CPU's fast type",
    "int8_float16": "8-bit weights, float16 elsewhere, for CUDA; int8_float32 on CPU",
    "int8_bfloat16": "8-bit weights, bfloat16 elsewhere, for recent GPUs; int8_float32 on CPU",
}
FULL = "float32"
# What each stored type computes in on CPU, which has float32, int8 and int8_float32 kernels only
# (ctranslate2.get_supported_compute_types("cpu")): 16-bit floats are widened, int8 keeps its int8 GEMMs.
CPU_COMPUTE = {
    "float32": "float32",
    "float16": "float32",
    "bfloat16": "float32",
    "int8": "int8_float32",
    "int8_float16": "int8_float32",
    "int8_bfloat16": "int8_float32",
}
# The float type from_pretrained loads the checkpoint in: the output's where the output is a 16-bit type (the same
# rounding as the converter's cast afterwards; and int8 scaling, done in place, then copies a 16-bit model rather
# than a memory-mapped float32 one: 476 MB instead of 780 MB in write's measurement); else the checkpoint's ("auto").
_LOAD_DTYPE = {"float16": "float16", "int8_float16": "float16", "bfloat16": "bfloat16", "int8_bfloat16": "bfloat16"}
# CTranslate2's DataType enum, the order model.bin stores the type ids in (include/ctranslate2/types.h).
_BIN_DTYPES = ("float32", "int8", "int16", "int32", "float16", "bfloat16")


def write(model_dir: Path, out_dir: Path, quant: str, chat_template: str | None) -> list[Path]:
    """Convert the transformers model in `model_dir` into `out_dir` (recreated by the converter) with `quant`
    weights, and save its tokenizer there with `chat_template`; the files written.

    Peak memory: the model once (from_pretrained, in the output's 16-bit type for the 16-bit outputs, else in the
    checkpoint's own dtype and memory-mapped), plus the fused QKV matrices the loaders build (a quarter of the
    layers' weights); the converter then replaces its tensors one at a time with the output's. Measured on a
    150M-parameter GPT-J (584 MB in float32), beyond the mapped checkpoint: float32 -> float32 327 MB, bf16 ->
    float32 726 MB (the float32 output once), float32 -> int8 777 MB (the converter scales the mapped weights in
    place, which copies them), float32 -> float16 481 MB, float32 -> int8_float16 476 MB.
    """
    from transformers import AutoTokenizer

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    _check_family(model_dir)
    if quant not in QUANTS:
        raise ValueError(f"quant={quant}: not a CTranslate2 type here; choose one of {', '.join(QUANTS)}")
    _Converter(str(model_dir), _LOAD_DTYPE.get(quant, "auto")).convert(str(out_dir), quantization=quant, force=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(out_dir)
    return sorted(p for p in out_dir.iterdir() if p.is_file())


def load(out_dir: Path, threads: int | None = None) -> CTranslate2Runtime:
    """The export in `out_dir` running in CTranslate2 on CPU (`threads` intra-op threads; None: CTranslate2's own)."""
    return CTranslate2Runtime(Path(out_dir), threads)


class CTranslate2Runtime:
    """A finetune.export.runtime.Runtime over ctranslate2.Generator: the stored type decides the compute type."""

    engine = "CTranslate2"

    def __init__(self, out_dir: Path, threads: int | None):
        self.quantization = stored_quantization(out_dir)
        self.compute_type = CPU_COMPUTE[self.quantization]
        # Generators take token strings for a prompt to decode from: the converter's vocabulary, in id order
        self._tokens = json.loads((out_dir / "vocabulary.json").read_text(encoding="utf-8"))
        self._generator = ctranslate2.Generator(
            str(out_dir), device="cpu", compute_type=self.compute_type, intra_threads=threads or 0
        )

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        # forward_batch returns raw logits (log-probs only with return_log_probs=True), [batch, len, vocab] in the
        # compute type's float: float32 on CPU
        out = self._generator.forward_batch([list(ids)])
        return np.array(out, dtype=np.float32)[0]

    def greedy(self, ids: Sequence[int], n: int) -> list[int]:
        """The prompt forwarded at once into the KV cache (include_prompt_in_result=False), then n steps of argmax
        (sampling_topk=1, beam_size=1). end_token=[] leaves no end token: EOS is generated like any token and
        decoding goes on (min_length=n would instead mask EOS out and change the argmax)."""
        if n <= 0:
            return []
        result = self._generator.generate_batch(
            [[self._tokens[i] for i in ids]],
            max_length=n,
            sampling_topk=1,
            beam_size=1,
            end_token=[],
            include_prompt_in_result=False,
        )
        return list(result[0].sequences_ids[0])

    def tokenize(self, text: str) -> None:
        return None  # CTranslate2 carries no tokenizer of its own: the training tokenizer is saved beside it

    def close(self) -> None:
        self._generator.unload_model()
        del self._generator


def stored_quantization(out_dir: Path) -> str:
    """The quantization model.bin was written with, read from its variables' headers (data skipped): the weights'
    types, scalars (flags, sizes) and int8 scales aside, are one float type, or int8 and the float type the
    converter cast the rest (biases, norms) to."""
    types = set()
    with open(Path(out_dir) / "model.bin", "rb") as f:
        version = _unpack(f, "I")
        if version != 6:
            raise ValueError(f"{out_dir}/model.bin: CTranslate2 binary version {version}; this reader knows 6")
        _string(f)  # the spec's name
        _unpack(f, "I")  # its revision
        for _ in range(_unpack(f, "I")):
            name = _string(f)
            dims = _unpack(f, "B")
            f.seek(4 * dims, 1)
            dtype = _BIN_DTYPES[_unpack(f, "B")]
            f.seek(_unpack(f, "I"), 1)
            if dims and not name.endswith("_scale"):
                types.add(dtype)
    floats = types - {"int8"}
    if len(floats) != 1 or not floats <= {"float32", "float16", "bfloat16"}:
        raise ValueError(f"{out_dir}/model.bin: weights of types {sorted(types)}, not a CTranslate2 quantization")
    (rest,) = floats
    if "int8" in types:
        return "int8" if rest == "float32" else f"int8_{rest}"
    return rest


def _unpack(f, fmt: str) -> int:
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) != size:
        raise ValueError(f"{f.name}: truncated")
    return struct.unpack(fmt, data)[0]


def _string(f) -> str:
    """model.bin's strings: a uint16 length, then that many bytes ending in NUL."""
    return f.read(_unpack(f, "H"))[:-1].decode("utf-8")


def _check_family(model_dir: Path) -> None:
    """ValueError for a model CTranslate2 has no loader for, naming the export formats that do take it."""
    from finetune.export import formats

    family = json.loads((model_dir / "config.json").read_text(encoding="utf-8")).get("model_type")
    if family in FAMILIES:
        return
    name = formats.FAMILY_NAMES.get(family, family)
    works = formats.available(family)
    raise ValueError(
        f"{name} models cannot be exported to CTranslate2: it has loaders for "
        f"{' and '.join(formats.FAMILY_NAMES[f] for f in FAMILIES)} only; "
        + (f"{name} exports to {' or '.join(works)}" if works else f"no export format takes {name}")
    )


class _Converter(TransformersConverter):
    """ctranslate2.converters.TransformersConverter (4.x) with its GPT-J / GPT-NeoX loaders' defects fixed from
    outside, leaving the loaders (and their weight layout) as CTranslate2 ships them:

    - GPTNeoXLoader reads config.rotary_pct, which transformers 5 moved to rope_parameters["partial_rotary_factor"]:
      every GPT-NeoX conversion raised AttributeError. Restored on the loaded config before the loader reads it.
    - GPTNeoXLoader ignores the rotary base (rotary_emb_base, now rope_parameters["rope_theta"]) and any RoPE
      scaling: CTranslate2's default base 10,000 (Pythia's) was used whatever the model says. The base is set on
      every layer; a scaled RoPE is refused rather than converted wrong.
    - GPTNeoXLoader reads the LM head as model.embed_out, which transformers 5 renamed lm_head (AttributeError):
      the head is given back under its old name.
    - Neither loader writes layer_norm_epsilon: CTranslate2 then uses its default. Written from the config.
    - GPTJLoader does not pad the vocabulary to the embedding's rows as GPTNeoXLoader does: a GPT-J whose embedding
      has more rows than its tokenizer has tokens (GPT-J-6B's 50,400 rows, saved with GPT-2's 50,257-token tokenizer
      without its 143 placeholder tokens) failed validation. Padded the same way.

    from_pretrained gets `dtype` from us (see write) instead of the converter's load_as_float16 / config dtype.
    """

    def __init__(self, model_dir: str, dtype: str):
        super().__init__(model_dir)
        self._dtype = dtype
        self._config = self._tokenizer = None

    def load_model(self, model_class, model_name_or_path, **kwargs):
        config = kwargs["config"]
        if config.model_type == "gpt_neox":
            rope = config.rope_parameters
            if rope.get("rope_type", "default") != "default":
                raise ValueError(
                    f"{model_name_or_path}: RoPE scaling {rope['rope_type']!r}; CTranslate2's GPT-NeoX loader has "
                    "no RoPE scaling, so the export would not compute what the model does"
                )
            config.rotary_pct = rope["partial_rotary_factor"]
        self._config = config
        model = super().load_model(model_class, model_name_or_path, **{**kwargs, "dtype": self._dtype})
        if config.model_type == "gpt_neox":
            model.embed_out = model.get_output_embeddings()
        return model

    def load_tokenizer(self, tokenizer_class, model_name_or_path, **kwargs):
        self._tokenizer = super().load_tokenizer(tokenizer_class, model_name_or_path, **kwargs)
        return self._tokenizer

    def _load(self):
        spec = super()._load()
        gc.collect()  # the transformers model: its tensors the spec did not take go before quantizing
        config = self._config
        spec.config.layer_norm_epsilon = (
            config.layer_norm_eps if config.model_type == "gpt_neox" else config.layer_norm_epsilon
        )
        if config.model_type == "gpt_neox":
            for layer in spec.decoder.layer:
                layer.self_attention.rotary_base = np.float32(config.rope_parameters["rope_theta"])
        ids = self._tokenizer.get_vocab()
        rows = spec.get_vocabulary_size()
        if config.model_type == "gptj" and len(ids) < rows:
            padding = [f"<extra_id_{i}>" for i in range(rows - len(ids))]  # GPTNeoXLoader's names for them
            spec.register_vocabulary(sorted(ids, key=ids.get) + padding)
        return spec
