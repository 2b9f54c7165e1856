"""ONNX export of GPT-Neo (and GPT-J, GPT-NeoX) with its KV cache, and the ONNX Runtime the gate asks.

ONNX is the one format that runs GPT-Neo outside PyTorch: llama.cpp and CTranslate2 have no GPT-Neo graph. One
decoder graph does prefill and decoding, with Optimum's names so onnxruntime-genai / Optimum users recognise it:
inputs `input_ids` [batch, seq], `attention_mask` [batch, past+seq], `position_ids` [batch, seq] and
`past_key_values.{i}.key|value` [batch, heads, past, head_dim] (past = 0 on the first step); outputs `logits`
[batch, seq, vocab] and `present.{i}.key|value` [batch, heads, past+seq, head_dim], fed back as the next past.
onnx_config.json beside it says how to feed it (layers, heads, head_dim, GPT-Neo's window and local layers, EOS).

What is exported is transformers' own model in eager attention, wrapped by `_decoder` only to rebuild a
DynamicCache from the flat past tensors and flatten it back: no attention code of ours, so the graph computes what
the project's model computes. For GPT-Neo that is each layer's own band (its `bias` buffer: causal for global
layers, causal within the last `window_size` positions for local ones, sliced by cache length as eager slices it;
two Constant tensors in the graph), scores in float32 and no 1/sqrt(head_dim) scaling. The project's SDPA layer
(finetune.models.neo_attention, there because upstream's flash-attention path ignores the window and eager is
O(T^2)) applies the same band; the tests compare the export with both.

Exporter: the TorchScript one (`dynamo=False`; deprecated since torch 2.9, present in every torch < 3 the project
allows). The dynamo exporter gives the same graph (8e-7 max logit difference on tiny GPT-Neo) but spends 20-60 s
in symbolic-shape reasoning over the band slicing on a 4-layer model on 2 cores, against ~2 s. A trace freezes
the Python branches transformers' cache and mask code took; they hold for every input that follows the interface
above (the mask covers past+seq; an empty past computes what the traced non-empty one does), and
tests/test_export_onnx.py checks an empty past, single-token steps past the window, a left-padded batch, GPT-J and
GPT-NeoX against transformers.
"""

from __future__ import annotations

import inspect
import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from finetune.export.runtime import Runtime

FAMILIES = ("gpt_neo", "gptj", "gpt_neox")
QUANTS = {
    "fp32": "every weight float32: full precision, the same logits (~1e-6) and greedy tokens as transformers",
    "int8": "MatMul weights int8 per output channel, activations quantized on the fly (onnxruntime "
    "quantize_dynamic); embeddings, norms and biases float32: 30-50% of fp32 (the embedding weighs most in small "
    "models), CPU",
}
FULL = "fp32"
OPSET = 17  # LayerNormalization's first opset: onnxruntime >= 1.14 and onnxruntime-genai load it
EXTERNAL_DATA_BYTES = 2 * 2**30  # protobuf's limit: a graph whose weights pass it keeps them in MODEL + ".data"
MODEL = "model.onnx"
CONFIG = "onnx_config.json"
_TRACE_SHAPE = (2, 3, 5)  # batch, seq, past of the example the graph is traced with: distinct and > 1


def write(model_dir: Path, out_dir: Path, quant: str, chat_template: str | None) -> list[Path]:
    """Write `out_dir`/model.onnx (+ model.onnx.data past 2 GB), onnx_config.json and the tokenizer files.

    The model is loaded whole in float32 (bf16 or sharded safetensors are upcast), traced once, and for int8
    quantized from the float32 graph; peak memory is two to three float32 copies of the model.
    """
    import onnx
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if quant not in QUANTS:
        raise ValueError(f"ONNX quant {quant!r}: choose one of {', '.join(QUANTS)}")
    config = AutoConfig.from_pretrained(model_dir)
    _check_family(config.model_type, model_dir)
    work = out_dir / ".onnx-export"  # the exporter's and quantizer's own files, removed when done
    work.mkdir()
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
        traced = _export(model.eval(), work / "fp32" / MODEL)
        del model
        if quant == "int8":
            files = _save(onnx.load(_quantize(traced, work / "int8" / MODEL)), out_dir / MODEL)
        else:
            files = _save(_share_transposed(onnx.load(traced)), out_dir / MODEL)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    onnx.checker.check_model(str(out_dir / MODEL))  # by path: external data is checked where it lies
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = chat_template
    files += [Path(p) for p in tokenizer.save_pretrained(out_dir)]
    (out_dir / CONFIG).write_text(json.dumps(_describe(config, quant, out_dir, files), indent=2) + "\n")
    return sorted({f for f in [*files, out_dir / CONFIG] if f.is_file()})


def load(out_dir: Path, threads: int | None = None) -> Runtime:
    """The export in `out_dir` in an onnxruntime InferenceSession on the CPU."""
    return OnnxRuntime(Path(out_dir), threads)


def _check_family(family: str, model_dir: Path) -> None:
    """Refuse a family whose export is not tested here, naming it and the formats that do run it."""
    if family in FAMILIES:
        return
    from finetune.export import formats

    others = [name for name in formats.available(family) if name != "onnx"]
    raise ValueError(
        f"{model_dir}: ONNX export supports {', '.join(FAMILIES)} (GPT-Neo, GPT-J, GPT-NeoX/Pythia) and this is a "
        f"{family} model; " + (f"export it as {' or '.join(others)}" if others else "no export format supports it")
    )


def _export(model, path: Path) -> Path:
    """Trace `model` (float32, eager attention) behind `_decoder` into `path` (past 2 GB the exporter writes each
    tensor to a file beside it)."""
    import torch

    path.parent.mkdir(parents=True)
    layers, heads, head_dim = _shape(model.config)
    batch, seq, past = _TRACE_SHAPE
    example = (
        torch.randint(0, model.config.vocab_size, (batch, seq)),
        torch.ones(batch, past + seq, dtype=torch.long),
        torch.arange(past, past + seq).expand(batch, seq),
        *(torch.zeros(batch, heads, past, head_dim) for _ in range(2 * layers)),
    )
    names = _names(layers)
    with torch.no_grad():
        torch.onnx.export(
            _decoder(model),
            example,
            str(path),
            dynamo=False,
            input_names=names["inputs"],
            output_names=names["outputs"],
            dynamic_axes=_dynamic_axes(names),
            opset_version=OPSET,
        )
    return path


def _decoder(model):
    """`model` behind the flat ONNX interface: the past tensors become the DynamicCache transformers' own forward
    takes, and the updated cache comes back as flat present tensors (nothing else of the model is replaced)."""
    import torch
    from transformers import DynamicCache

    # transformers renamed the cache argument (past_key_values -> cache) within 5.x
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    class Decoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, position_ids, *past):
            cache = DynamicCache()
            for i in range(len(past) // 2):
                cache.update(past[2 * i], past[2 * i + 1], i)
            logits = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=True,
                **{cache_arg: cache},
            ).logits
            return (logits, *(t for layer in cache.layers for t in (layer.keys, layer.values)))

    return Decoder().eval()


def _quantize(source: Path, path: Path) -> Path:
    """onnxruntime's dynamic int8 quantization of the MatMul weights (the embedding Gathers stay float32: token and
    position rows are read one at a time, so int8 would cost accuracy and save no compute)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    path.parent.mkdir(parents=True)
    quantize_dynamic(
        source,
        path,
        op_types_to_quantize=["MatMul"],
        weight_type=QuantType.QInt8,
        per_channel=True,
        use_external_data_format=_weight_bytes(source) > EXTERNAL_DATA_BYTES,
    )
    return path


def _share_transposed(proto):
    """Store a tied embedding once: the trace folds the LM head's `weight.T` into a second copy (GPT-Neo ties them:
    154 MB of GPT-Neo-125M's ~650 MB), so the MatMul reads a Transpose of the embedding instead, which onnxruntime
    folds when the session loads. Not for int8, where the quantizer needs the MatMul weight as an initializer (and
    stores that copy in 8 bits)."""
    import onnx
    from onnx import numpy_helper

    gathered = {node.input[0] for node in proto.graph.node if node.op_type == "Gather"}
    embeddings = {tuple(t.dims): t for t in proto.graph.initializer if t.name in gathered and len(t.dims) == 2}
    used_elsewhere = {i for node in proto.graph.node if node.op_type != "MatMul" for i in node.input}
    for copy in list(proto.graph.initializer):
        embedding = embeddings.get(tuple(reversed(copy.dims)))
        if embedding is None or copy.name in used_elsewhere:
            continue
        if not np.array_equal(numpy_helper.to_array(embedding).T, numpy_helper.to_array(copy)):
            continue
        transposed = f"{embedding.name}.T"
        proto.graph.node.insert(0, onnx.helper.make_node("Transpose", [embedding.name], [transposed], perm=[1, 0]))
        for node in proto.graph.node:
            node.input[:] = [transposed if i == copy.name else i for i in node.input]
        proto.graph.initializer.remove(copy)
    return proto


def _save(proto, path: Path) -> list[Path]:
    """`proto` at `path`, its tensors (weights, and constants such as GPT-Neo's attention bands) in one
    `path`.data file when they pass EXTERNAL_DATA_BYTES."""
    import onnx

    constants = [a.t for node in proto.graph.node if node.op_type == "Constant" for a in node.attribute]
    external = sum(len(t.raw_data) for t in [*proto.graph.initializer, *constants]) > EXTERNAL_DATA_BYTES
    data = path.with_name(path.name + ".data")
    onnx.save_model(
        proto,
        str(path),
        save_as_external_data=external,
        all_tensors_to_one_file=True,
        location=data.name,
        convert_attribute=True,
    )
    return [path, data] if external else [path]


def _weight_bytes(path: Path) -> int:
    """The bytes of every file the exporter wrote (the graph and any external tensors)."""
    return sum(p.stat().st_size for p in path.parent.iterdir() if p.is_file())


def _shape(config) -> tuple[int, int, int]:
    """(layers, heads, head_dim) of the KV cache."""
    heads = config.num_attention_heads
    return config.num_hidden_layers, heads, config.hidden_size // heads


def _names(layers: int) -> dict[str, list[str]]:
    past = [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    present = [f"present.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    return {"inputs": ["input_ids", "attention_mask", "position_ids", *past], "outputs": ["logits", *present]}


def _dynamic_axes(names: dict[str, list[str]]) -> dict[str, dict[int, str]]:
    """Optimum's axis names: batch_size, sequence_length, past_sequence_length, total_sequence_length."""
    seq = {0: "batch_size", 1: "sequence_length"}
    axes = {"input_ids": seq, "position_ids": seq, "logits": seq}
    axes["attention_mask"] = {0: "batch_size", 1: "total_sequence_length"}
    axes |= {n: {0: "batch_size", 2: "past_sequence_length"} for n in names["inputs"][3:]}
    axes |= {n: {0: "batch_size", 2: "total_sequence_length"} for n in names["outputs"][1:]}
    return axes


def _describe(config, quant: str, out_dir: Path, files: list[Path]) -> dict:
    """onnx_config.json: what a user (and `load`) needs to feed the graph."""
    import onnx

    layers, heads, head_dim = _shape(config)
    graph = onnx.load(str(out_dir / MODEL), load_external_data=False).graph
    local = [i for i, kind in enumerate(getattr(config, "attention_layers", None) or []) if kind == "local"]
    return {
        "format": "onnx",
        "family": config.model_type,
        "quant": quant,
        "model": MODEL,
        "external_data": next((f.name for f in files if f.name == MODEL + ".data"), None),
        "opset": OPSET,
        "num_layers": layers,
        "num_heads": heads,
        "head_dim": head_dim,
        "vocab_size": config.vocab_size,
        "max_positions": getattr(config, "max_position_embeddings", None) or config.n_positions,
        "window_size": getattr(config, "window_size", None) if local else None,
        "local_layers": local,  # these attend to the last window_size positions only (the band is in the graph)
        "eos_token_id": config.eos_token_id,
        "bos_token_id": config.bos_token_id,
        "inputs": {v.name: _dims(v) for v in graph.input},
        "outputs": {v.name: _dims(v) for v in graph.output},
        "feeding": "first step: past_key_values.* with past_sequence_length 0; attention_mask 1 for every real "
        "token of past + new (0 for left padding); position_ids count real tokens from 0; present.* become the "
        "next step's past_key_values.*",
    }


def _dims(value) -> list:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


class OnnxRuntime:
    """An export in onnxruntime (CPUExecutionProvider): logits from one forward with an empty past, greedy decoding
    with the graph's own present -> past KV cache."""

    engine = "ONNX Runtime"

    def __init__(self, out_dir: Path, threads: int | None = None):
        import onnxruntime as ort

        self.config = json.loads((out_dir / CONFIG).read_text(encoding="utf-8"))
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self._session = ort.InferenceSession(
            str(out_dir / self.config["model"]), options, providers=["CPUExecutionProvider"]
        )
        self._past_names = [i.name for i in self._session.get_inputs() if i.name.startswith("past_key_values.")]

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        self._check(ids, 0)
        return self._forward(ids, self._empty_past(), 0)[0][0].astype(np.float32)

    def greedy(self, ids: Sequence[int], n: int) -> list[int]:
        self._check(ids, n)
        outputs, start, tokens = self._forward(ids, self._empty_past(), 0), len(ids), []
        while len(tokens) < n:
            tokens.append(int(np.argmax(outputs[0][0, -1])))
            if len(tokens) < n:
                outputs = self._forward(tokens[-1:], outputs[1:], start)
                start += 1
        return tokens

    def tokenize(self, text: str) -> None:
        return None  # the graph takes token ids; the tokenizer files beside it are transformers'

    def close(self) -> None:
        self._session = None

    def _forward(self, ids: Sequence[int], past: list[np.ndarray], start: int) -> list[np.ndarray]:
        """One step over `ids` (one sequence) after `start` cached positions."""
        end = start + len(ids)
        feed = {
            "input_ids": np.asarray([ids], dtype=np.int64),
            "attention_mask": np.ones((1, end), dtype=np.int64),
            "position_ids": np.arange(start, end, dtype=np.int64)[None],
        }
        return self._session.run(None, feed | dict(zip(self._past_names, past)))

    def _empty_past(self) -> list[np.ndarray]:
        shape = (1, self.config["num_heads"], 0, self.config["head_dim"])
        return [np.zeros(shape, dtype=np.float32) for _ in self._past_names]

    def _check(self, ids: Sequence[int], n: int) -> None:
        limit = self.config["max_positions"]
        if not ids or len(ids) + n > limit:
            raise ValueError(f"{len(ids)} prompt + {n} new tokens: need 1 to {limit} in all (the model's positions)")
