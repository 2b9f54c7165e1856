"""GGUF export of tiny GPT-NeoX run in llama.cpp (through llama-cpp-python), compared with transformers, and the
Ollama Modelfile's TEMPLATE compared with the training chat template it stands for."""

from __future__ import annotations

import json
import re
import shutil

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from finetune.data import templates
from finetune.export import gguf_file, modelfile
from finetune.inference.prompting import Prompting

CHATML = templates.load("chatml").chat_template
CONVERSATION = [
    {"role": "system", "content": "You are a careful legal assistant."},
    {"role": "user", "content": "What is consideration in a contract?"},
    {"role": "assistant", "content": "Something of value each party gives in exchange."},
    {"role": "user", "content": "Is a promise enough?"},
]
TEXTS = [  # what the byte-level pre-tokenizer must split as transformers does
    "Ünïcödé 🚀 café, naïve: 3.14 x 33333 ... 'll 've 're\t\ttabs\n\n\n   spaces   end  ",
    "<|endoftext|><|padding|> the end<|endoftext|>",
]


def _runtime(folder):
    """A context manager for a loaded export (the gate loads one at a time and closes it)."""

    class Loaded:
        def __enter__(self):
            self.runtime = gguf_file.load(folder, threads=2)
            return self.runtime

        def __exit__(self, *_):
            self.runtime.close()

    return Loaded()


def _hf_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def _hf_greedy(model, ids, n: int) -> list[int]:
    """Argmax decoding by full forward passes: no cache, so nothing but the weights is shared with llama.cpp."""
    out = list(ids)
    for _ in range(n):
        out.append(int(_hf_logits(model, out)[-1].argmax()))
    return out[len(ids) :]


def _export(model_dir, folder, quant="f32", chat_template=CHATML):
    folder.mkdir(parents=True)
    (path,) = gguf_file.write(model_dir, folder, quant, chat_template)
    return path


@pytest.fixture(scope="module")
def neox(tiny_models):
    return tiny_models["neox"]


@pytest.fixture(scope="module")
def tokenizer(neox):
    return AutoTokenizer.from_pretrained(neox)


@pytest.fixture(scope="module")
def hf(neox):
    return AutoModelForCausalLM.from_pretrained(neox, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompt_ids(tokenizer) -> list[int]:
    """A two-turn ChatML prompt: EOS (a special token) inside, ~90 tokens."""
    text = tokenizer.apply_chat_template(CONVERSATION, chat_template=CHATML, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def exports(neox, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("gguf")
    return {quant: _export(neox, root / quant, quant).parent for quant in gguf_file.QUANTS}


def test_full_precision_matches_transformers(exports, hf, prompt_ids):
    assert len(prompt_ids) > 40
    with _runtime(exports[gguf_file.FULL]) as runtime:
        assert runtime.engine == "llama.cpp"
        logits = runtime.logits(prompt_ids)
        assert logits.shape == (len(prompt_ids), hf.config.vocab_size) and logits.dtype == np.float32
        # ~5e-4 measured: llama.cpp's CPU GELU is an f16 lookup table; the weights themselves are exact
        assert np.abs(logits - _hf_logits(hf, prompt_ids)).max() < 1e-3
        assert runtime.greedy(prompt_ids, 16) == _hf_greedy(hf, prompt_ids, 16)
        assert runtime.greedy(prompt_ids[:5], 3) == _hf_greedy(hf, prompt_ids[:5], 3)  # the cache was reset


def test_quantized_exports_agree_and_shrink(exports, hf, prompt_ids):
    reference = _hf_logits(hf, prompt_ids).argmax(-1)
    for quant in ("f16", "bf16", "q8_0"):
        with _runtime(exports[quant]) as runtime:
            agreement = (runtime.logits(prompt_ids).argmax(-1) == reference).mean()
        assert agreement >= 0.9, (quant, agreement)  # 0.99 measured on the random tiny model (flat logits)
    size = {quant: next(folder.glob("*.gguf")).stat().st_size for quant, folder in exports.items()}
    assert size["f32"] > size["f16"] == size["bf16"] > size["q8_0"]


def test_llama_cpp_tokenizes_as_transformers(exports, tokenizer):
    rendered = []
    for name in templates.available():
        template = templates.load(name)
        rendered.append(
            tokenizer.apply_chat_template(
                template.conversation(template.example), chat_template=template.chat_template, tokenize=False
            )
        )
    assert any(tokenizer.eos_token in text for text in rendered)
    with _runtime(exports["q8_0"]) as runtime:
        for text in rendered + TEXTS:
            assert runtime.tokenize(text) == tokenizer(text, add_special_tokens=False)["input_ids"], text
    fields = gguf.GGUFReader(next(exports["f32"].glob("*.gguf"))).fields
    assert _string(fields["tokenizer.ggml.pre"]) == "gpt-2"
    assert _string(fields["tokenizer.chat_template"]) == CHATML
    assert _int(fields["tokenizer.ggml.eos_token_id"]) == tokenizer.eos_token_id
    assert _int(fields["tokenizer.ggml.padding_token_id"]) == tokenizer.pad_token_id
    assert _int(fields["tokenizer.ggml.add_bos_token"]) == 0


def test_added_tokens_and_padded_vocab(neox, tmp_path):
    """ChatML markers added as special tokens (CONTROL), a plain added token (USER_DEFINED), and embedding rows past
    the tokenizer (UNUSED [PADi]) as Pythia has."""
    tokenizer = AutoTokenizer.from_pretrained(neox)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.add_tokens(["<think>"])
    model = AutoModelForCausalLM.from_pretrained(neox, dtype=torch.float32).eval()
    model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64, mean_resizing=False)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    path = _export(tmp_path / "model", tmp_path / "gguf")
    text = tokenizer.apply_chat_template(CONVERSATION, chat_template=CHATML, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text + "<think> hmm", add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") in ids and tokenizer.convert_tokens_to_ids("<think>") in ids
    with _runtime(path.parent) as runtime:
        assert runtime.tokenize(text + "<think> hmm") == ids
        logits = runtime.logits(ids)
    assert logits.shape[1] == model.config.vocab_size > len(tokenizer)
    assert np.abs(logits - _hf_logits(model, ids)).max() < 1e-3
    fields = gguf.GGUFReader(path).fields
    types = [int(fields["tokenizer.ggml.token_type"].parts[i][0]) for i in fields["tokenizer.ggml.token_type"].data]
    tokens = [bytes(fields["tokenizer.ggml.tokens"].parts[i]).decode() for i in fields["tokenizer.ggml.tokens"].data]
    kind = dict(zip(tokens, types))
    assert {kind[t] for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|padding|>")} == {gguf.TokenType.CONTROL}
    assert kind["<think>"] == gguf.TokenType.USER_DEFINED
    assert tokens[-1] == f"[PAD{len(tokens) - 1}]" and types[-1] == gguf.TokenType.UNUSED


def test_sharded_bf16_model(neox, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(neox, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "model", max_shard_size="1MB")
    AutoTokenizer.from_pretrained(neox).save_pretrained(tmp_path / "model")
    assert (tmp_path / "model" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "model").glob("model-*.safetensors"))) > 1
    path = _export(tmp_path / "model", tmp_path / "gguf")
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32).eval()
    ids = list(range(2, 60))
    with _runtime(path.parent) as runtime:
        assert np.abs(runtime.logits(ids) - _hf_logits(reference, ids)).max() < 1e-3
        assert runtime.greedy(ids, 8) == _hf_greedy(reference, ids, 8)


def test_tied_head_and_linear_rope_scaling(neox, tmp_path):
    """A tied LM head is written as llama.cpp's own output tensor; linear RoPE scaling and a rotary fraction other
    than Pythia's 0.25 reach llama.cpp (unscaled RoPE differs by ~7e-3 over these 298 positions)."""
    config = AutoConfig.from_pretrained(
        neox,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
    )
    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "model")
    AutoTokenizer.from_pretrained(neox).save_pretrained(tmp_path / "model")
    path = _export(tmp_path / "model", tmp_path / "gguf", chat_template=None)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32).eval()
    ids = list(range(2, 300))
    with _runtime(path.parent) as runtime:
        assert np.abs(runtime.logits(ids) - _hf_logits(reference, ids)).max() < 1e-3
    assert "tokenizer.chat_template" not in gguf.GGUFReader(path).fields


def test_refuses_what_llama_cpp_cannot_run(tiny_models, neox, tmp_path):
    for arch, family in (("neo", "gpt_neo"), ("gptj", "gptj")):
        out = tmp_path / arch
        out.mkdir()
        with pytest.raises(ValueError, match=rf"{family} model.*gpt_neox|gpt_neox.*{family} model"):
            gguf_file.write(tiny_models[arch], out, "f32", None)
        assert not any(out.iterdir())
    shutil.copytree(neox, tmp_path / "metaspace")
    spec = json.loads((tmp_path / "metaspace" / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True}
    (tmp_path / "metaspace" / "tokenizer.json").write_text(json.dumps(spec))
    (tmp_path / "out").mkdir()
    with pytest.raises(ValueError, match=r"metaspace/tokenizer\.json.*Metaspace"):
        gguf_file.write(tmp_path / "metaspace", tmp_path / "out", "f32", None)
    with pytest.raises(ValueError, match="q4_k"):
        gguf_file.write(neox, tmp_path / "out", "q4_k", None)
    assert not any((tmp_path / "out").iterdir())


def test_tampered_weights_change_the_logits(exports, prompt_ids, tmp_path):
    """A weight negated in the file (every float's sign bit flipped) must show in llama.cpp's logits, so a gate
    comparing logits catches a corrupted export."""
    original = next(exports["f32"].glob("*.gguf"))
    (tmp_path / "bad").mkdir()
    tampered = shutil.copy(original, tmp_path / "bad" / original.name)
    tensor = next(t for t in gguf.GGUFReader(tampered).tensors if t.name == "blk.1.attn_qkv.weight")
    offset, size = int(tensor.data_offset), int(tensor.n_bytes)
    with open(tampered, "r+b") as f:
        f.seek(offset)
        data = bytearray(f.read(size))
        data[3::4] = bytes(b ^ 0x80 for b in data[3::4])  # every weight's sign bit
        f.seek(offset)
        f.write(data)
    with _runtime(exports["f32"]) as runtime:
        good = runtime.logits(prompt_ids)
    with _runtime(tampered.parent) as runtime:
        bad = runtime.logits(prompt_ids)
    assert np.isfinite(bad).all() and np.abs(bad - good).max() > 0.1  # 0.69 measured


def _string(field) -> str:
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def _int(field) -> int:
    return int(field.parts[field.data[0]][0])


# --- Ollama Modelfile ---------------------------------------------------------------------------------------------

_ACTION = re.compile(r"\{\{\s*(.*?)\s*\}\}")


def _fill(template: str, prompt: str, system: str = "") -> str:
    """Ollama's Go template for the constructs the Modelfile emits: {{ .Prompt }}, {{ .System }}, {{ "literal" }},
    {{ if .System }} ... {{ else }} ... {{ end }}."""
    out, emitting, pos = [], [True], 0
    for match in _ACTION.finditer(template):
        if all(emitting):
            out.append(template[pos : match.start()])
        pos, action = match.end(), match.group(1)
        if action == "if .System":
            emitting.append(bool(system))
        elif action == "else":
            emitting[-1] = not emitting[-1]
        elif action == "end":
            emitting.pop()
        elif all(emitting):
            out.append({".Prompt": prompt, ".System": system}[action] if action.startswith(".") else json.loads(action))
    assert emitting == [True], template
    return "".join(out) + template[pos:]


def _prompting(template) -> Prompting:
    """How generate writes prompts for a run of this data template (finetune.inference.generate._prompting)."""
    if template.conversation_spec:
        return Prompting("conversation", template.chat_template, template.name)
    user = next(m for m in template.messages if m["role"] == "user")
    extra = tuple(k for k in user if k not in ("role", "content"))
    return Prompting("fields", template.chat_template, template.name, extra)


@pytest.mark.parametrize("name", ["alpaca", "dolly", "chatml", "sharegpt", "prompt_completion"])
def test_modelfile_template_renders_as_training(name, tokenizer, tmp_path):
    template = templates.load(name)
    prompting = _prompting(template)
    path = modelfile.write(tmp_path, "model-q8_0.gguf", template.chat_template, tokenizer.eos_token, name)
    text = path.read_text(encoding="utf-8")
    go = re.search(r'^TEMPLATE """(.*?)"""$', text, re.DOTALL | re.MULTILINE).group(1)
    assert (go, re.findall(r'^PARAMETER stop "(.*)"$', text, re.MULTILINE)) == modelfile.go_template(
        template.chat_template, tokenizer.eos_token
    )
    for prompt in ("What is a tort?", "Q: What is a tort?\nA:", " leading space, {{ braces }} and\n\nlines "):
        assert _fill(go, prompt) == prompting.text(tokenizer, prompt)
        if prompting.kind == "conversation":
            system = "You are a careful legal assistant."
            assert _fill(go, prompt, system) == prompting.text(tokenizer, prompt, system=system)


def test_modelfile_contents(tokenizer, tmp_path):
    path = modelfile.write(tmp_path, "model-f16.gguf", CHATML, "<|endoftext|>", "chatml", {"temperature": 0})
    lines = path.read_text(encoding="utf-8").splitlines()
    assert "FROM ./model-f16.gguf" in lines and "PARAMETER temperature 0" in lines
    stops = [line for line in lines if line.startswith("PARAMETER stop ")]
    assert stops == ['PARAMETER stop "<|endoftext|>"', 'PARAMETER stop "<|im_end|>"', 'PARAMETER stop "<|im_start|>"']
    completion = templates.load("completion")
    for chat_template, name in ((completion.chat_template, "completion"), (None, None)):
        path = modelfile.write(tmp_path, "m.gguf", chat_template, "<|endoftext|>", name)
        assert 'TEMPLATE """{{ .Prompt }}"""' in path.read_text(encoding="utf-8").splitlines()
    assert modelfile.go_template(None, "<|endoftext|>") == ("{{ .Prompt }}", ["<|endoftext|>"])
