"""CTranslate2 export (finetune.export.ctranslate2_model): GPT-J and GPT-NeoX converted by CTranslate2's own converter
under transformers 5 compute in ctranslate2.Generator (CPU) what transformers computes.

The reference is transformers with eager attention in float32 (the gate's). The models are the tiny checkpoints
`sharpened`: weight matrices x4, norms and biases moved off 1 and 0, embeddings padded past the tokenizer as GPT-J-6B's
(50,400 rows) and Pythia's are. At the tiny models' initial scale attention is almost uniform and logits are ~1, so a
wrong rotary layout moves logits by only ~1e-2; sharpened, by 0.3-0.6 (a rotary base left at 10,000 by 0.3, a layer
norm epsilon left at its default by 1.7), far above the 1e-4 asserted here (measured: ~3e-6).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from finetune.export import ctranslate2_model as ct2

ARCH = {"gptj": "gptj", "gpt_neox": "neox"}  # family -> tiny builder's name
PAD_ROWS = 40
TOLERANCE = 1e-4  # float32 logits, absolute (largest logit ~4)
GREEDY = 16
CHAT = "{% for m in messages %}<|user|>{{ m['content'] }}\n{% endfor %}<|assistant|>"
TEXT = (
    "The tenant shall keep the premises in good repair and return them at the end of the lease. A patient with a "
    "fever should drink fluids, rest, and see a doctor if it lasts more than three days. The court may award damages."
)


def sharpen(src: Path, dst: Path, dtype: torch.dtype = torch.float32, shard: str | None = None, **config) -> Path:
    """A copy of the tiny model at `dst` that exercises every weight (see the module docstring), in `dtype`,
    optionally sharded and with config attributes changed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    model.resize_token_embeddings(len(tokenizer) + PAD_ROWS)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.mul_(4)
            else:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))
    for key, value in config.items():
        setattr(model.config, key, value)
    model.to(dtype).save_pretrained(dst, **({"max_shard_size": shard} if shard else {}))
    tokenizer.save_pretrained(dst)
    return dst


def reference(model_dir: Path, ids: list[int], n: int = GREEDY) -> tuple[np.ndarray, list[int]]:
    """transformers eager float32: logits at every position, and n argmax tokens each from a full forward pass
    (no KV cache: independent of the incremental decoding under test)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].numpy()
        tokens = list(ids)
        for _ in range(n):
            tokens.append(int(model(torch.tensor([tokens])).logits[0, -1].argmax()))
    return logits, tokens[len(ids) :]


def prompt(model_dir: Path) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)(TEXT).input_ids


def export(model_dir: Path, out: Path, quant: str, chat_template: str | None = None) -> Path:
    out.mkdir(parents=True)
    ct2.write(model_dir, out, quant, chat_template)
    return out


@pytest.fixture(scope="module")
def sharp(tiny_models, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ct2_models")
    return {family: sharpen(tiny_models[arch], root / family) for family, arch in ARCH.items()}


@pytest.fixture(scope="module")
def full(sharp, tmp_path_factory) -> dict[str, Path]:
    """The float32 export of each family, with CHAT as its chat template."""
    root = tmp_path_factory.mktemp("ct2_float32")
    return {family: export(model, root / family, "float32", CHAT) for family, model in sharp.items()}


@pytest.fixture(scope="module")
def expected(sharp) -> dict[str, tuple[list[int], np.ndarray, list[int]]]:
    """The prompt's ids, transformers' logits and greedy tokens, per family."""
    return {family: (ids := prompt(model), *reference(model, ids)) for family, model in sharp.items()}


@pytest.mark.parametrize("family", ct2.FAMILIES)
def test_float32_logits_and_greedy_equal_transformers(family, full, expected):
    """Fails without the GPT-NeoX fixes (the converter raised AttributeError on rotary_pct and embed_out) and without
    the GPT-J vocabulary padding (validation failed on the padded embedding)."""
    ids, logits, tokens = expected[family]
    runtime = ct2.load(full[family], threads=2)
    try:
        assert (runtime.engine, runtime.compute_type, runtime.tokenize(TEXT)) == ("CTranslate2", "float32", None)
        got = runtime.logits(ids)
        assert got.dtype == np.float32 and got.shape == logits.shape == (len(ids), logits.shape[1]) and len(ids) > 20
        diff = float(np.abs(got - logits).max())
        print(
            f"{family} float32: max abs logit diff {diff:.2e} over {len(ids)} positions, largest logit "
            f"{np.abs(logits).max():.2f}"
        )
        assert diff < TOLERANCE
        assert runtime.greedy(ids, GREEDY) == tokens
    finally:
        runtime.close()


@pytest.mark.parametrize("family", ct2.FAMILIES)
def test_greedy_goes_on_past_eos(family, full, expected, tmp_path):
    """The gate compares a fixed number of tokens: the model's EOS (here the 4th token it generates) must not stop
    CTranslate2's decoding, nor be masked out of the argmax."""
    ids, _, tokens = expected[family]
    folder = shutil.copytree(full[family], tmp_path / "export")
    vocabulary = json.loads((folder / "vocabulary.json").read_text(encoding="utf-8"))
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    (folder / "config.json").write_text(json.dumps({**config, "eos_token": vocabulary[tokens[3]]}), encoding="utf-8")
    runtime = ct2.load(folder, threads=2)
    try:
        assert runtime.greedy(ids, GREEDY) == tokens
    finally:
        runtime.close()


@pytest.mark.parametrize("family", ct2.FAMILIES)
def test_folder_carries_the_training_tokenizer(family, full, sharp):
    """CTranslate2 users tokenize with transformers from the export folder itself: same ids, the chat template given,
    and CTranslate2's vocabulary in the tokenizer's id order (padded rows named as GPTNeoXLoader names them)."""
    from transformers import AutoTokenizer

    folder = full[family]
    source, own = AutoTokenizer.from_pretrained(sharp[family]), AutoTokenizer.from_pretrained(folder)
    assert own(TEXT).input_ids == source(TEXT).input_ids
    assert own.chat_template == CHAT
    vocabulary = json.loads((folder / "vocabulary.json").read_text(encoding="utf-8"))
    assert vocabulary == source.convert_ids_to_tokens(list(range(len(source)))) + [
        f"<extra_id_{i}>" for i in range(PAD_ROWS)
    ]
    assert {"model.bin", "config.json", "vocabulary.json", "tokenizer.json"} <= {p.name for p in folder.iterdir()}


@pytest.mark.parametrize("family", ct2.FAMILIES)
@pytest.mark.parametrize(
    ("quant", "compute", "floor"), [("int8", "int8_float32", 0.9), ("int8_float16", "int8_float32", 0.9)]
)
def test_quantized_top1_agreement(family, quant, compute, floor, sharp, expected, tmp_path):
    """int8 weights run with CPU's int8 kernels (a float16 rest widened to float32); the argmax at each position
    agrees with transformers' as often as the gate's 8-bit threshold asks (measured: 96-97%)."""
    ids, logits, _ = expected[family]
    runtime = ct2.load(export(sharp[family], tmp_path / "export", quant), threads=2)
    try:
        assert (runtime.quantization, runtime.compute_type) == (quant, compute)
        agreement = float((runtime.logits(ids).argmax(-1) == logits.argmax(-1)).mean())
    finally:
        runtime.close()
    print(f"{family} {quant}: top-1 agreement {agreement:.1%} over {len(ids)} positions")
    assert agreement >= floor


def test_float16_computes_in_float32_on_cpu(sharp, expected, tmp_path):
    """float16 weights: CPU has no float16 kernels, so CTranslate2 computes in float32 (said, not a fallback)."""
    ids, logits, _ = expected["gpt_neox"]
    runtime = ct2.load(export(sharp["gpt_neox"], tmp_path / "export", "float16"), threads=2)
    try:
        assert (runtime.quantization, runtime.compute_type) == ("float16", "float32")
        got = runtime.logits(ids)
    finally:
        runtime.close()
    assert float((got.argmax(-1) == logits.argmax(-1)).mean()) >= 0.97
    assert float(np.abs(got - logits).max()) < 1e-2


@pytest.mark.parametrize("family", ct2.FAMILIES)
def test_bf16_sharded_checkpoint_converts(family, tiny_models, tmp_path):
    """A bf16 checkpoint in several safetensors shards (as big models ship) converts to float32 exactly: bf16 widens
    to float32 without rounding on both sides."""
    model = sharpen(tiny_models[ARCH[family]], tmp_path / "bf16", torch.bfloat16, shard="200KB")
    assert (model / "model.safetensors.index.json").is_file() and len(list(model.glob("*.safetensors"))) > 1
    ids = prompt(model)
    logits, _ = reference(model, ids, 0)
    runtime = ct2.load(export(model, tmp_path / "export", "float32"), threads=2)
    try:
        assert runtime.quantization == "float32"
        assert float(np.abs(runtime.logits(ids) - logits).max()) < TOLERANCE
    finally:
        runtime.close()


@pytest.mark.parametrize(
    ("family", "config"),
    [
        ("gpt_neox", {"rope_parameters": {"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 0.25}}),
        ("gpt_neox", {"layer_norm_eps": 1e-2, "use_parallel_residual": False}),
        ("gptj", {"layer_norm_epsilon": 1e-2}),
    ],
    ids=["neox-rope-theta", "neox-eps-sequential", "gptj-eps"],
)
def test_config_values_the_upstream_loaders_drop(family, config, tiny_models, tmp_path):
    """The rotary base and the layer norm epsilon reach CTranslate2 (its loaders drop them: without the fix logits
    differ by 0.3 and 1.7); GPT-NeoX's sequential residual (use_parallel_residual=False) converts too."""
    model = sharpen(tiny_models[ARCH[family]], tmp_path / "model", **config)
    ids = prompt(model)
    logits, _ = reference(model, ids, 0)
    runtime = ct2.load(export(model, tmp_path / "export", "float32"), threads=2)
    try:
        assert float(np.abs(runtime.logits(ids) - logits).max()) < TOLERANCE
    finally:
        runtime.close()


def test_scaled_rope_is_refused(tiny_models, tmp_path):
    """CTranslate2's GPT-NeoX loader has no RoPE scaling: refused, not converted into a different model."""
    rope = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0, "partial_rotary_factor": 0.25}
    model = sharpen(tiny_models["neox"], tmp_path / "model", rope_parameters=rope)
    with pytest.raises(ValueError, match="RoPE scaling 'linear'"):
        export(model, tmp_path / "export", "float32")


def test_gpt_neo_is_refused_naming_what_works(tiny_models, tmp_path):
    with pytest.raises(ValueError, match=r"GPT-Neo models cannot be exported to CTranslate2.*GPT-Neo exports to onnx"):
        export(tiny_models["neo"], tmp_path / "export", "float32")
    assert not list((tmp_path / "export").iterdir())


def test_tampered_weights_are_caught(full, expected, tmp_path):
    """Bytes flipped in the middle of model.bin (a layer's weights) change the logits or fail the load: the gate
    cannot pass a damaged export."""
    ids, _, _ = expected["gpt_neox"]
    folder = shutil.copytree(full["gpt_neox"], tmp_path / "export")
    data = bytearray((folder / "model.bin").read_bytes())
    middle = len(data) // 2
    data[middle : middle + 16] = bytes(b ^ 0xFF for b in data[middle : middle + 16])
    (folder / "model.bin").write_bytes(bytes(data))
    clean = ct2.load(full["gpt_neox"], threads=2)
    want = clean.logits(ids)
    clean.close()
    try:
        runtime = ct2.load(folder, threads=2)
        got = runtime.logits(ids)
        runtime.close()
    except (RuntimeError, ValueError):
        return
    assert not np.allclose(got, want, atol=1e-3)
