"""ONNX export (finetune.export.onnx_model) run in onnxruntime against transformers' eager model: GPT-Neo's local
window survives the export (prompt longer than the window, KV-cache decoding past position 100), int8 keeps the
top token, a bf16 sharded folder exports with external data, GPT-J and GPT-NeoX export too, and a tampered weight
shows in the logits."""

from __future__ import annotations

import inspect
import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DynamicCache,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoForCausalLM,
)

from finetune.data import templates
from finetune.export import onnx_model

CHATML = templates.load("chatml").chat_template
# transformers 5.x renamed forward's past_key_values to cache (the old name warns, then goes in 5.40)
CACHE = "cache" if "cache" in inspect.signature(GPTNeoForCausalLM.forward).parameters else "past_key_values"
TOLERANCE = 1e-4  # fp32 logits, ONNX Runtime vs transformers (~1e-6 measured)
TEXT = (
    "The tenant shall keep the premises in good repair and return them at the end of the lease. A patient with a "
    "fever should rest, drink fluids and see a doctor if it lasts more than three days. Consideration is something "
    "of value each party gives in exchange for the other's promise. "
)


def _hf(folder, **config) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager", **config)


def _hf_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def _hf_decode(model, ids, n: int) -> tuple[list[int], list[np.ndarray]]:
    """Argmax decoding with transformers' KV cache: the tokens and each step's next-token logits."""
    cache, tokens, steps = DynamicCache(), [], []
    with torch.no_grad():
        logits = model(torch.tensor([ids]), use_cache=True, **{CACHE: cache}).logits[0, -1]
        for _ in range(n):
            steps.append(logits.numpy())
            tokens.append(int(logits.argmax()))
            logits = model(torch.tensor([tokens[-1:]]), use_cache=True, **{CACHE: cache}).logits[0, -1]
    return tokens, steps


def _ort_decode(folder, ids, n: int) -> tuple[list[int], list[np.ndarray]]:
    """The same loop on the bare InferenceSession, fed as onnx_config.json tells a user to feed it."""
    config = json.loads((folder / onnx_model.CONFIG).read_text())
    session = ort.InferenceSession(str(folder / config["model"]), providers=["CPUExecutionProvider"])
    past_names = [name for name in config["inputs"] if name.startswith("past_key_values.")]
    past = [np.zeros((1, config["num_heads"], 0, config["head_dim"]), np.float32) for _ in past_names]
    new, start, tokens, steps = list(ids), 0, [], []
    for _ in range(n):
        end = start + len(new)
        feed = {
            "input_ids": np.array([new]),
            "attention_mask": np.ones((1, end), np.int64),
            "position_ids": np.arange(start, end)[None],
        }
        logits, *past = session.run(None, feed | dict(zip(past_names, past)))
        assert past[0].shape[2] == end  # the present holds every position: the window is the graph's mask
        steps.append(logits[0, -1])
        tokens.append(int(logits[0, -1].argmax()))
        new, start = tokens[-1:], end
    return tokens, steps


def _zero_middle_of(folder, tensor_name: str) -> None:
    """Overwrite 4 KiB in the middle of an initializer's bytes on disk (in model.onnx or its external data file)."""
    proto = onnx.load(str(folder / onnx_model.MODEL), load_external_data=False)
    tensor = next(t for t in proto.graph.initializer if t.name == tensor_name)
    if tensor.external_data:
        fields = {e.key: e.value for e in tensor.external_data}
        path, offset, length = folder / fields["location"], int(fields.get("offset", 0)), int(fields["length"])
    else:
        path = folder / onnx_model.MODEL
        offset, length = path.read_bytes().find(tensor.raw_data), len(tensor.raw_data)
        assert offset > 0
    data = bytearray(path.read_bytes())
    middle = offset + length // 2
    data[middle : middle + 4096] = bytes(4096)
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def neo(tiny_models):
    return tiny_models["neo"]


@pytest.fixture(scope="module")
def hf(neo):
    return _hf(neo).eval()


@pytest.fixture(scope="module")
def prompt(neo) -> list[int]:
    """80 tokens of English: past the 32-token window, so decoding 24 more crosses position 100."""
    ids = AutoTokenizer.from_pretrained(neo)(TEXT * 4)["input_ids"][:80]
    assert len(ids) == 80
    return ids


@pytest.fixture(scope="module")
def fp32(neo, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx-fp32")
    files = onnx_model.write(neo, out, "fp32", CHATML)
    assert {f.name for f in files} >= {"model.onnx", "onnx_config.json", "tokenizer.json", "chat_template.jinja"}
    return out


def test_fp32_logits_match_transformers_at_every_position_past_the_window(fp32, hf, neo, prompt):
    assert hf.config.window_size == 32 and hf.config.attention_layers == ["global", "local", "global", "local"]
    runtime = onnx_model.load(fp32, threads=2)
    try:
        assert runtime.engine == "ONNX Runtime" and runtime.tokenize(TEXT) is None
        logits = runtime.logits(prompt)
    finally:
        runtime.close()
    assert logits.shape == (80, hf.config.vocab_size) and logits.dtype == np.float32
    assert np.abs(logits - _hf_logits(hf, prompt)).max() < TOLERANCE  # 7.7e-7 measured
    # the project's own GPT-Neo layer (SDPA with the band, what training and serving load) computes the same
    from finetune.models import neo_attention

    project = AutoModelForCausalLM.from_pretrained(neo, dtype=torch.float32, attn_implementation=neo_attention.NAME)
    assert type(project.transformer.h[1].attn.attention) is neo_attention.NeoSdpaAttention
    assert np.abs(logits - _hf_logits(project.eval(), prompt)).max() < TOLERANCE

    config = json.loads((fp32 / onnx_model.CONFIG).read_text())
    assert config["window_size"] == 32 and config["local_layers"] == [1, 3] and config["num_layers"] == 4
    assert list(config["inputs"])[:4] == ["input_ids", "attention_mask", "position_ids", "past_key_values.0.key"]
    assert config["inputs"]["past_key_values.3.value"] == ["batch_size", 4, "past_sequence_length", 32]
    assert config["outputs"]["present.0.key"] == ["batch_size", 4, "total_sequence_length", 32]
    assert config["external_data"] is None and not (fp32 / "model.onnx.data").exists()
    assert (fp32 / "chat_template.jinja").read_text() == CHATML
    vocab_sized = [t for t in onnx.load(str(fp32 / "model.onnx")).graph.initializer if 1024 in t.dims]
    assert len(vocab_sized) == 1  # the tied embedding / LM head is stored once


def test_kv_cache_decoding_matches_transformers_past_position_100(fp32, hf, prompt):
    """24 greedy tokens after 80: every step's logits within tolerance of transformers' cached decoding, the same
    tokens from the bare session and from the Runtime, whose cache starts empty on every call."""
    expected, hf_steps = _hf_decode(hf, prompt, 24)
    tokens, steps = _ort_decode(fp32, prompt, 24)
    assert np.abs(np.array(steps) - np.array(hf_steps)).max() < TOLERANCE
    assert tokens == expected
    runtime = onnx_model.load(fp32, threads=2)
    try:
        assert runtime.greedy(prompt, 24) == expected
        assert runtime.greedy(prompt[:5], 3) == _hf_decode(hf, prompt[:5], 3)[0]
        assert runtime.greedy(prompt, 0) == []
        with pytest.raises(ValueError, match="need 1 to 512"):
            runtime.greedy(prompt, 500)
    finally:
        runtime.close()


def test_a_left_padded_batch_decodes_as_transformers_does(fp32, hf, prompt):
    """The batch axis and the attention mask: two rows, the second left-padded by 9, prefill then two steps."""
    session = ort.InferenceSession(str(fp32 / "model.onnx"), providers=["CPUExecutionProvider"])
    past_names = [i.name for i in session.get_inputs() if i.name.startswith("past_key_values.")]
    ids = torch.tensor([prompt[:60], [0] * 9 + prompt[9:60]])
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    past = [np.zeros((2, 4, 0, 32), np.float32) for _ in past_names]
    cache = DynamicCache()
    for _ in range(3):
        feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "position_ids": positions.numpy()}
        logits, *past = session.run(None, feed | dict(zip(past_names, past)))
        with torch.no_grad():
            expected = hf(
                input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **{CACHE: cache}
            ).logits.numpy()
        real = mask[:, -ids.shape[1] :].bool().numpy()
        assert np.abs(logits - expected)[real].max() < TOLERANCE
        ids = torch.tensor(expected[:, -1].argmax(-1))[:, None]
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
        positions = positions[:, -1:] + 1


def test_the_local_window_survives_the_export(fp32, neo, prompt):
    """The export equals transformers with window 32 (the tests above) and not the same weights with local layers
    made global (window = every position): an export that dropped the window would match the latter and fail."""
    windowless = _hf(neo, window_size=512).eval()
    runtime = onnx_model.load(fp32, threads=2)
    try:
        exported = runtime.logits(prompt)
    finally:
        runtime.close()
    gap = np.abs(exported - _hf_logits(windowless, prompt)).max(-1)
    assert gap[:32].max() < TOLERANCE  # inside the window local and global attention agree
    assert gap[32:].min() > 100 * TOLERANCE  # past it every position differs
    windowless_tokens, _ = _hf_decode(windowless, prompt, 24)
    tokens, _ = _ort_decode(fp32, prompt, 24)
    assert tokens != windowless_tokens


def test_int8_keeps_the_top_token(neo, hf, tmp_path):
    files = onnx_model.write(neo, tmp_path, "int8", None)
    assert not (tmp_path / "chat_template.jinja").exists() and tmp_path / "model.onnx" in files
    tokenizer = AutoTokenizer.from_pretrained(neo)
    prompts = [tokenizer(TEXT[i:] + TEXT)["input_ids"][:100] for i in (0, 93, 190)]
    runtime = onnx_model.load(tmp_path, threads=2)
    try:
        agree = [runtime.logits(ids).argmax(-1) == _hf_logits(hf, ids).argmax(-1) for ids in prompts]
        runtime.greedy(prompts[0], 4)
    finally:
        runtime.close()
    agreement = float(np.concatenate(agree).mean())
    print(f"int8 top-1 agreement with transformers fp32: {agreement:.3f} over {sum(map(len, agree))} positions")
    assert agreement >= 0.9  # ~0.95 measured on the random tiny model (flat logits, many near-ties)
    types = {t.data_type for t in onnx.load(str(tmp_path / "model.onnx")).graph.initializer}
    assert onnx.TensorProto.INT8 in types


def test_bf16_sharded_folder_exports_with_external_data_and_a_tampered_tensor_shows(neo, tmp_path, monkeypatch):
    model = tmp_path / "model"
    AutoModelForCausalLM.from_pretrained(neo, dtype=torch.bfloat16).save_pretrained(model, max_shard_size="1MB")
    AutoTokenizer.from_pretrained(neo).save_pretrained(model)
    assert len(list(model.glob("model-*.safetensors"))) > 1
    assert json.loads((model / "config.json").read_text())["dtype"] == "bfloat16"
    monkeypatch.setattr(onnx_model, "EXTERNAL_DATA_BYTES", 0)  # the > 2 GB layout, on a tiny model
    out = tmp_path / "onnx"
    out.mkdir()
    files = onnx_model.write(model, out, "fp32", None)
    assert out / "model.onnx.data" in files and not (out / ".onnx-export").exists()
    assert json.loads((out / onnx_model.CONFIG).read_text())["external_data"] == "model.onnx.data"
    assert (out / "model.onnx").stat().st_size * 20 < (out / "model.onnx.data").stat().st_size  # the graph only
    onnx.checker.check_model(str(out / "model.onnx"))
    ids = list(range(2, 90))
    reference = _hf_logits(_hf(model).eval(), ids)
    runtime = onnx_model.load(out, threads=2)
    try:
        assert np.abs(runtime.logits(ids) - reference).max() < TOLERANCE
    finally:
        runtime.close()
    _zero_middle_of(out, "model.transformer.wte.weight")  # the embedding, also the tied LM head
    runtime = onnx_model.load(out, threads=2)
    try:
        assert not np.allclose(runtime.logits(ids), reference, atol=1e-2)
    finally:
        runtime.close()


def test_a_tampered_initializer_in_the_graph_file_shows(fp32, hf, prompt, tmp_path):
    folder = shutil.copytree(fp32, tmp_path / "copy")
    proto = onnx.load(str(folder / "model.onnx"))
    weight = max(proto.graph.initializer, key=lambda t: len(t.raw_data)).name  # the embedding / tied LM head
    _zero_middle_of(folder, weight)
    runtime = onnx_model.load(folder, threads=2)
    try:
        assert not np.allclose(runtime.logits(prompt), _hf_logits(hf, prompt), atol=1e-2)
    finally:
        runtime.close()


@pytest.mark.parametrize("arch", ["gptj", "neox"])
def test_gptj_and_neox_export_too(arch, tiny_models, tmp_path, prompt):
    model = _hf(tiny_models[arch]).eval()
    onnx_model.write(tiny_models[arch], tmp_path, "fp32", None)
    assert json.loads((tmp_path / onnx_model.CONFIG).read_text())["local_layers"] == []
    ids = [i % model.config.vocab_size for i in prompt]
    runtime = onnx_model.load(tmp_path, threads=2)
    try:
        assert np.abs(runtime.logits(ids) - _hf_logits(model, ids)).max() < TOLERANCE
        assert runtime.greedy(ids, 24) == _hf_decode(model, ids, 24)[0]
    finally:
        runtime.close()


def test_an_unsupported_family_or_quant_is_refused(neo, tmp_path):
    model = tmp_path / "gpt2"
    GPT2LMHeadModel(
        GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0)
    ).save_pretrained(model)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ValueError, match=r"supports gpt_neo, gptj, gpt_neox .* this is a gpt2 model"):
        onnx_model.write(model, out, "fp32", None)
    with pytest.raises(ValueError, match=r"ONNX quant 'q4': choose one of fp32, int8"):
        onnx_model.write(neo, out, "q4", None)
    assert not any(out.iterdir())
