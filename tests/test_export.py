"""finetune export end to end: a run's adapter merged on the fly, written, loaded in its real runtime and gated
against transformers; every gate path (pass, a tampered tensor, a refused format) and the bad inputs."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import yaml

from finetune import console as cli
from finetune.adapters import push, serving
from finetune.errors import ConfigError, DiskFullError, IntegrityError
from finetune.export import command, formats
from finetune.runs import checkpoints

from helpers import run_cli


def export(*args: str):
    return command.run(cli.parse(list(args), command.OPTIONS, "target"))


@pytest.fixture
def run_copy(tiny_run, tmp_path) -> Path:
    """A private copy of the shared tiny NeoX LoRA run (adapter only, no merged/)."""
    return Path(shutil.copytree(tiny_run, tmp_path / "run"))


def test_formats_table_agrees_with_the_format_modules():
    for fmt in formats.FORMATS.values():
        module = formats.module(fmt)
        assert tuple(module.FAMILIES) == fmt.families, fmt.name
        assert module.FULL == fmt.default_quant and fmt.default_quant in module.QUANTS


def test_a_format_the_architecture_cannot_have_is_refused_naming_what_works(tiny_models, tmp_path):
    result = run_cli("export", str(tiny_models["neo"]), "format=gguf", f"out={tmp_path / 'x'}")
    assert result.returncode == 2, result.stderr
    assert "llama.cpp has no runtime for GPT-Neo" in result.stderr and "use format=onnx" in result.stderr
    result = run_cli("export", str(tiny_models["gptj"]), "format=gguf", "quant=q4_k", f"out={tmp_path / 'x'}")
    assert result.returncode == 2 and "use format=ctranslate2" in result.stderr
    result = run_cli("export", str(tiny_models["neox"]), "format=gguf", "quant=q4_k", f"out={tmp_path / 'x'}")
    assert result.returncode == 2 and "quant=q4_k: not a gguf type; choose one of f32" in result.stderr
    assert not (tmp_path / "x").exists()


def test_gguf_export_of_a_run_merges_on_the_fly_passes_its_gate_and_records_it(run_copy):
    out = export(str(run_copy), "format=gguf", "tokens=8")
    assert out == run_copy / "exports" / "gguf-f32"
    assert not out.with_name("gguf-f32.merging").exists() and not out.with_name("gguf-f32.partial").exists()
    record = json.loads((out / "export.json").read_text())
    assert record["valid"] and record["source"]["merged_on_the_fly"] and record["source"]["merge_gate"]["passed"]
    gate = record["gate"]
    assert gate["precision"] == "full" and gate["greedy_identical"] == len(gate["prompts"]) >= 1
    assert all(p["tokenizer_equal"] for p in gate["prompts"])  # llama.cpp's own tokenizer, on the rendered prompts
    assert gate["max_abs_diff"] <= gate["tolerance"]
    assert checkpoints.verify(out) is None  # sealed: every file in MANIFEST.json
    # llama-cpp-python's own chat API, fed the template stored in the GGUF, writes the prompt training wrote
    import llama_cpp
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    from transformers import AutoTokenizer

    stored = llama_cpp.Llama(str(out / "model-f32.gguf"), vocab_only=True, verbose=False).metadata
    trained = AutoTokenizer.from_pretrained(run_copy / "adapter")
    assert stored["tokenizer.chat_template"] == trained.chat_template
    messages = [{"role": "user", "content": "What is a tort?"}]
    formatter = Jinja2ChatFormatter(stored["tokenizer.chat_template"], trained.eos_token, trained.eos_token)
    assert formatter(messages=messages).prompt == trained.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    modelfile = (out / "Modelfile").read_text()
    assert "FROM ./" in modelfile and 'PARAMETER stop "<|endoftext|>"' in modelfile
    llama = {r["engine"]: r for r in json.loads((out / "serving.json").read_text())}["llama.cpp"]
    assert llama["loads"] == "yes" and llama["measured"] and "gguf f32 (passed)" in llama["note"]
    card = (out / "README.md").read_text()
    assert "library_name: gguf" in card and "Export check (gguf f32)" in card and "— passed" in card
    # the run's own serving.json now says what was measured, and its manifest still verifies
    adapter_rows = {r["engine"]: r for r in json.loads((run_copy / "adapter" / "serving.json").read_text())}
    assert adapter_rows["llama.cpp"]["measured"] and adapter_rows["CTranslate2"]["loads"] == "export"
    assert adapter_rows["ONNX Runtime"]["loads"] == "export" and adapter_rows["vLLM"]["loads"] == "no"
    assert checkpoints.verify(run_copy / "adapter") is None

    # push stages the export with its card, through the allowlist, and nothing else
    staged = push.run(cli.parse([str(run_copy), "export=gguf-f32", "dry_run=true"], push.OPTIONS, "target"))
    names = {p.name for p in staged.iterdir()} - {push.STAGING_MARKER}
    assert names == {"model-f32.gguf", "Modelfile", "export.json", "serving.json", "README.md"}  # no MANIFEST.json
    assert "library_name: gguf" in (staged / "README.md").read_text()

    # an existing export is refused without overwrite, replaced with it
    with pytest.raises(ConfigError, match="already exists; choose another out= or pass overwrite=true"):
        export(str(run_copy), "format=gguf", "tokens=8")
    assert export(str(run_copy), "format=gguf", "tokens=4", "overwrite=true") == out
    # a quantized type is judged on agreement and log-prob gap, against thresholds that can be raised
    q8 = export(str(run_copy), "format=gguf", "quant=q8_0", "tokens=4")
    gate = json.loads((q8 / "export.json").read_text())["gate"]
    assert gate["precision"] == "8-bit" and gate["thresholds"] == {
        "min_top1_agreement": 0.9,
        "max_mean_logprob_gap": 0.1,
    }
    assert gate["top1_agreement"] >= 0.9 and 0 < gate["mean_logprob_gap"] <= 0.1 and gate["tie_margin"] == 0.05
    with pytest.raises(IntegrityError, match="mean log-probability gap .* exceeds 1e-06"):
        export(str(run_copy), "format=gguf", "quant=q8_0", "tokens=4", "overwrite=true", "max_logprob_gap=1e-6")
    assert (q8.parent / "gguf-q8_0.invalid" / "export.json").is_file()
    assert json.loads((q8 / "export.json").read_text())["valid"]  # the earlier good export is kept
    rows = {r["engine"]: r for r in json.loads((run_copy / "adapter" / "serving.json").read_text())}
    assert "gguf q8_0 (passed)" in rows["llama.cpp"]["note"] and "FAILED" not in rows["llama.cpp"]["note"]
    # verify=true re-runs the gate on what is there (the merged source was temporary: said so)
    with pytest.raises(ConfigError, match="merged on the fly and removed"):
        export(str(run_copy), "format=gguf", "verify=true")


def test_a_tampered_tensor_fails_the_gate_and_is_set_aside(tiny_models, tmp_path, monkeypatch):
    """A converter that wrote one wrong tensor: the runtime loads it, the gate sees the logits move, the folder goes
    to <out>.invalid and the command exits 3 (IntegrityError)."""
    fmt = formats.FORMATS["ctranslate2"]
    module = formats.module(fmt)
    real_write = module.write

    def write_then_tamper(model_dir, out_dir, quant, chat_template):
        files = real_write(model_dir, out_dir, quant, chat_template)
        weights = out_dir / "model.bin"
        data = bytearray(weights.read_bytes())
        middle = len(data) // 2
        data[middle : middle + 4096] = bytes(4096)  # zeros over part of a weight matrix
        weights.write_bytes(bytes(data))
        return files

    monkeypatch.setattr(module, "write", write_then_tamper)
    model = Path(shutil.copytree(tiny_models["gptj"], tmp_path / "gptj"))
    out = tmp_path / "ct2"
    with pytest.raises(IntegrityError, match=r"does not answer as the trained model does; moved to .*ct2\.invalid"):
        export(str(model), "format=ctranslate2", f"out={out}", "tokens=8")
    assert not out.exists() and (tmp_path / "ct2.invalid" / "export.json").is_file()
    record = json.loads((tmp_path / "ct2.invalid" / "export.json").read_text())
    assert record["valid"] is False and record["gate"]["reasons"]


def test_onnx_export_of_gpt_neo_passes_with_a_prompt_longer_than_its_window(tiny_models, tmp_path):
    model = Path(shutil.copytree(tiny_models["neo"], tmp_path / "neo"))
    out = export(str(model), "format=onnx", f"out={tmp_path / 'onnx'}", "tokens=8")
    record = json.loads((out / "export.json").read_text())
    window = json.loads((model / "config.json").read_text())["window_size"]
    assert record["valid"] and max(p["prompt_tokens"] for p in record["gate"]["prompts"]) > window
    assert record["gate"]["greedy_identical"] == len(record["gate"]["prompts"])
    # verify=true re-runs the gate against the model it came from; the record, card and manifest follow
    assert export(str(model), "format=onnx", f"out={out}", "tokens=4", "verify=true") == out
    assert json.loads((out / "export.json").read_text())["gate"]["tokens"] == 4
    assert "Export check (onnx fp32)" in (out / "README.md").read_text() and checkpoints.verify(out) is None


def test_a_run_whose_base_is_gone_is_refused_naming_base(run_copy, tmp_path):
    config = yaml.safe_load((run_copy / "config.yaml").read_text())
    config["model"]["name_or_path"] = str(tmp_path / "moved-away")
    (run_copy / "config.yaml").write_text(yaml.safe_dump(config))
    result = run_cli("export", str(run_copy), "format=gguf")
    assert result.returncode == 2, result.stderr
    assert "base=" in result.stderr and "moved-away" in result.stderr
    assert not (run_copy / "exports").exists() or not any((run_copy / "exports").iterdir())


def test_out_must_not_replace_what_export_did_not_write(run_copy, tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="was not written by export"):
        export(str(run_copy), "format=gguf", f"out={theirs}", "overwrite=true")
    with pytest.raises(ConfigError, match="overlaps the weights it exports"):
        export(str(run_copy), "format=gguf", f"out={run_copy / 'adapter' / 'x'}")
    with pytest.raises(ConfigError, match="inside the run directory only"):
        export(str(run_copy), "format=gguf", f"out={run_copy / 'logs'}")
    base = Path(yaml.safe_load((run_copy / "config.yaml").read_text())["model"]["name_or_path"])
    with pytest.raises(ConfigError, match="overlaps the base model"):
        export(str(run_copy), "format=gguf", f"out={base / 'gguf'}")
    assert not (base / "gguf").exists() and not (base / "gguf.merging").exists()
    assert (theirs / "notes.txt").read_text() == "keep me"


def test_a_full_disk_mid_export_leaves_nothing_half_written(tiny_models, tmp_path, monkeypatch):
    module = formats.module(formats.FORMATS["gguf"])

    def write_until_full(model_dir, out_dir, quant, chat_template):
        (out_dir / "model-f32.gguf").write_bytes(b"GGUF" + bytes(1024))  # part of the file, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device", str(out_dir / "model-f32.gguf"))

    monkeypatch.setattr(module, "write", write_until_full)
    out = tmp_path / "gguf"
    with pytest.raises(DiskFullError, match="no space left on the device") as caught:
        export(str(tiny_models["neox"]), "format=gguf", f"out={out}")
    assert caught.value.reason == "disk_full"
    assert not out.exists() and not (tmp_path / "gguf.partial").exists() and not (tmp_path / "gguf.invalid").exists()


def test_serving_rows_for_export_engines_come_from_the_formats_and_measurements():
    rows = {r["engine"]: r for r in serving.report("gpt_neo", "merged")}
    assert rows["ONNX Runtime"]["loads"] == "export" and rows["llama.cpp"]["loads"] == rows["CTranslate2"]["loads"]
    assert rows["llama.cpp"]["loads"] == "no" and "no llama.cpp runtime for GPT-Neo" in rows["llama.cpp"]["note"]
    record = {
        "engine": "ONNX Runtime",
        "format": "onnx",
        "quant": "int8",
        "valid": False,
        "gate": {
            "engine": "ONNX Runtime",
            "precision": "8-bit",
            "top1_agreement": 0.5,
            "mean_logprob_gap": 0.4,
            "thresholds": {"min_top1_agreement": 0.9, "max_mean_logprob_gap": 0.1},
        },
    }
    measured = {r["engine"]: r for r in serving.report("gpt_neo", "merged", exports=[record])}["ONNX Runtime"]
    assert measured["loads"] == "no" and "onnx int8 (FAILED): ONNX Runtime vs transformers" in measured["note"]
