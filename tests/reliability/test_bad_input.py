"""Bad input found by the red team's fault pass (issue 20, "degraded"): each is refused or read correctly, named as
`file:line: reason` with the fix, before any model loads (exit 2), never trained silently or met as a traceback."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from finetune.config.compose import compose
from finetune.config.schema import DataConfig
from finetune.config.validate import validate
from finetune.data import templates
from finetune.data.sources import MAX_ROW_BYTES, read_rows
from finetune.data.tokenize import prepare
from finetune.errors import EXIT_CONFIG, ConfigError, DataError

from helpers import PROJECT, run_cli, tiny_overrides

GOOD = {"instruction": "Say hi", "output": "hi"}


def jsonl(path: Path, *lines: str) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def rejected(result) -> dict[str, tuple[str, str]]:
    return {r.where: (r.kind, r.reason) for r in result.rejected}


# --- data: NUL characters, duplicate keys -----------------------------------------------------------------------------


def test_nul_characters_are_bad_rows_in_every_format(tmp_path):
    good = json.dumps(GOOD)
    escaped = jsonl(tmp_path / "escaped.jsonl", good, json.dumps({"instruction": "a\u0000b", "output": "x"}), good)
    array = tmp_path / "array.json"
    array.write_text(json.dumps([GOOD, {"instruction": "a", "output": "bad\u0000"}]), encoding="utf-8")
    table = tmp_path / "raw.csv"
    table.write_bytes(b"instruction,output\nSay hi,hi\nraw\x00nul,x\nSay bye,bye\n")
    chat = jsonl(
        tmp_path / "chat.jsonl",
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "o\u0000k"}]}),
    )

    result = read_rows([str(escaped), str(array), str(table), str(chat)])
    problems = rejected(result)
    assert set(problems) == {f"{escaped}:2", f"{array}:[1]", f"{table}:3", f"{chat}:1"}
    assert {kind for kind, _ in problems.values()} == {"nul_character"}
    assert problems[f"{escaped}:2"][1].startswith("NUL character (U+0000) in 'instruction' at character 2")
    assert "'output'" in problems[f"{array}:[1]"][1] and "'instruction'" in problems[f"{table}:3"][1]
    assert "'messages[1].content'" in problems[f"{chat}:1"][1]
    assert len(result.rows) == 5 and not any("\x00" in str(row) for row in result.rows)


def test_duplicate_json_keys_are_bad_rows_naming_the_key(tmp_path):
    rows = jsonl(
        tmp_path / "rows.jsonl",
        json.dumps(GOOD),
        '{"instruction": "a", "output": "first", "output": "second"}',
        '{"messages": [{"role": "user", "content": "a", "content": "b"}]}',
    )
    array = tmp_path / "rows.json"
    array.write_text('[{"instruction": "a", "instruction": "b", "output": "c"}, {"instruction": "d", "output": "e"}]')
    problems = rejected(read_rows([str(rows), str(array)]))
    assert problems == {
        f"{rows}:2": (
            "duplicate_key",
            "duplicate key 'output': JSON keeps only the last value; remove or rename one of them",
        ),
        f"{rows}:3": (
            "duplicate_key",
            "duplicate key 'content' in 'messages[0]': JSON keeps only the last value; remove or rename one of them",
        ),
        f"{array}:[0]": (
            "duplicate_key",
            "duplicate key 'instruction': JSON keeps only the last value; remove or rename one of them",
        ),
    }
    columns = tmp_path / "columns.json"
    columns.write_text('{"instruction": ["a"], "output": ["b"], "output": ["c"]}')
    with pytest.raises(DataError, match=r"columns.json: column 'output' is given twice"):
        read_rows(str(columns))


def test_bad_rows_are_counted_by_reason_and_skip_invalid_drops_them(tmp_path, tiny_models):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["neo"])
    tokenizer.pad_token = tokenizer.eos_token
    path = jsonl(
        tmp_path / "rows.jsonl",
        *[json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) for i in range(40)],
        json.dumps({"instruction": "\u0000", "output": "x"}),
        '{"instruction": "a", "output": "b", "output": "c"}',
    )

    def config(**overrides):
        return OmegaConf.create(
            dataclasses.asdict(
                DataConfig(path=str(path), template="alpaca", max_length=256, eval_fraction=0.0, **overrides)
            )
        )

    with pytest.raises(DataError) as caught:
        prepare(config(), tokenizer, templates.load("alpaca"), seed=1)
    assert f"{path}:41: NUL character" in str(caught.value) and f"{path}:42: duplicate key 'output'" in str(
        caught.value
    )
    data = prepare(config(skip_invalid=True, max_dropped_fraction=0.1), tokenizer, templates.load("alpaca"), seed=1)
    assert data.accounting["rows_read"] == 42 and data.accounting["train_rows"] == 40
    assert data.accounting["rows_rejected"] == {"nul_character": 1, "duplicate_key": 1}


# --- data: sizes ------------------------------------------------------------------------------------------------------


def test_a_csv_field_over_128_kib_is_read_and_the_size_cap_is_an_option(tmp_path):
    big = "word " * 60_000  # 300 kB: the csv module's own limit (128 KiB) rejected the whole file
    table = tmp_path / "rows.csv"
    table.write_text(f'instruction,output\nSay hi,hi\n"{big}",long\nSay bye,bye\n', encoding="utf-8")
    result = read_rows(str(table))
    assert not result.rejected and [r["output"] for r in result.rows] == ["hi", "long", "bye"]
    assert result.rows[1]["instruction"] == big

    capped = read_rows(str(table), max_row_bytes=100_000)
    assert [r["output"] for r in capped.rows] == ["hi", "bye"]
    assert rejected(capped) == {
        f"{table}:3": (
            "row_too_large",
            "record of 0.3 MiB exceeds data.max_row_bytes=100000 (0.1 MiB); "
            "raise data.max_row_bytes to read it, or remove it",
        )
    }


MEASURE = textwrap.dedent("""
    import json, sys
    from finetune.data.sources import read_rows

    def peak():
        return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) * 1024

    before = peak()
    result = read_rows(sys.argv[1])
    print(json.dumps({"before": before, "after": peak(), "rows": len(result.rows),
                      "rejected": [[r.where, r.kind, r.reason, len(r.raw)] for r in result.rejected]}))
""")


def test_a_30_mb_jsonl_line_is_a_named_bad_row_read_in_bounded_memory(tmp_path):
    path = tmp_path / "rows.jsonl"
    line = json.dumps({"instruction": "dump", "output": "x" * 30_000_000})
    jsonl(path, json.dumps(GOOD), line, json.dumps(GOOD))
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, str(path)], cwd=PROJECT, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["rows"] == 2
    [[where, kind, reason, raw_length]] = report["rejected"]
    assert where == f"{path}:2" and kind == "row_too_large" and raw_length == 2000
    assert reason.startswith(f"line of 28.6 MiB exceeds data.max_row_bytes={MAX_ROW_BYTES} (8.0 MiB)")
    # Reading the line whole holds at least its 30 MB of bytes, and its text again (the old reader: ~90 MB, then GBs
    # in the tokenizer). Bounded reading holds at most data.max_row_bytes of it.
    grown = report["after"] - report["before"]
    assert grown < len(line) / 2, (
        f"peak RSS grew by {grown / 2**20:.1f} MiB while reading a {len(line) / 2**20:.1f} MiB line"
    )


# --- data: encodings --------------------------------------------------------------------------------------------------

EXCEL_ROWS = [("instruction", "output"), ("Übersetze: café", "translated"), ("Say hi", "hi")]


def test_a_utf16_tsv_from_excel_is_read_as_utf16_and_one_without_a_mark_names_iconv(tmp_path):
    text = "".join("\t".join(r) + "\r\n" for r in EXCEL_ROWS)
    excel = tmp_path / "excel.tsv"
    excel.write_bytes(text.encode("utf-16"))  # Excel's "Unicode text": a UTF-16 LE byte-order mark, CRLF
    result = read_rows(str(excel))
    assert not result.rejected
    assert [(r["instruction"], r["output"]) for r in result.rows] == EXCEL_ROWS[1:]
    assert result.notes == [f"{excel}: read as UTF-16 (it starts with that byte-order mark)"]

    lines = tmp_path / "rows.jsonl"
    lines.write_bytes(
        (json.dumps(GOOD) + "\n" + json.dumps({"instruction": "Ü", "output": "é"}, ensure_ascii=False) + "\n").encode(
            "utf-16"
        )
    )
    result = read_rows(str(lines))
    assert not result.rejected and [r["output"] for r in result.rows] == ["hi", "é"]

    bare = tmp_path / "bare.tsv"
    bare.write_bytes(text.encode("utf-16-le"))
    with pytest.raises(DataError) as caught:
        read_rows(str(bare))
    assert f"{bare}: looks like UTF-16LE text without a byte-order mark" in str(caught.value)
    assert f"`iconv -f UTF-16LE -t UTF-8 {bare} > {tmp_path / 'bare.utf8.tsv'}`" in str(caught.value)
    assert "latin1" not in str(caught.value)


def test_cli_exits_2_naming_each_bad_row_before_the_model_loads(tmp_path, tiny_models):
    path = jsonl(
        tmp_path / "rows.jsonl",
        *[json.dumps(GOOD)] * 8,
        json.dumps({"instruction": "a\u0000", "output": "b"}),
        '{"instruction": "a", "output": "b", "output": "c"}',
        json.dumps({"instruction": "a", "output": "y" * 3000}),
    )
    out = run_cli(
        *tiny_overrides("neo", tiny_models["neo"], tmp_path / "run"),
        f"data.path={path}",
        "data.eval_path=null",
        "data.max_row_bytes=2048",
    )
    assert out.returncode == EXIT_CONFIG, out.stderr[-3000:]
    assert f"{path}:9: NUL character (U+0000) in 'instruction'" in out.stderr
    assert f"{path}:10: duplicate key 'output'" in out.stderr
    assert f"{path}:11: line of 0.0 MiB exceeds data.max_row_bytes=2048" in out.stderr
    assert "Traceback" not in out.stderr and "model:" not in out.stderr


def test_data_max_row_bytes_is_documented_and_validated():
    assert DataConfig.__dataclass_fields__["max_row_bytes"].default == MAX_ROW_BYTES
    assert "max_row_bytes: 8388608" in (PROJECT / "conf" / "data" / "demo.yaml").read_text()
    assert "data.max_row_bytes" in (PROJECT / "README.md").read_text()
    with pytest.raises(ConfigError, match=r"data.max_row_bytes: must be a positive number of bytes"):
        validate(compose("demo", ["data.max_row_bytes=0"]))


# --- the base model's weights -----------------------------------------------------------------------------------------


def base_copy(tiny_models, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_models["neo"], tmp_path / "base"))


def problems_for(model_dir: Path, tmp_path: Path, *extra: str) -> str:
    with pytest.raises(ConfigError) as caught:
        validate(compose("demo", tiny_overrides("neo", model_dir, tmp_path / "run", *extra)))
    return "\n".join(caught.value.problems)


def test_a_base_with_only_pytorch_model_bin_is_refused_at_validation_with_the_conversion(tiny_models, tmp_path):
    import torch
    from safetensors.torch import load_file

    base = base_copy(tiny_models, tmp_path)
    torch.save(load_file(base / "model.safetensors"), base / "pytorch_model.bin")
    (base / "model.safetensors").unlink()
    text = problems_for(base, tmp_path)
    assert (
        f"model.name_or_path: {base} holds only pickled weights (pytorch_model.bin); training loads safetensors only"
        in text
    )
    assert f".save_pretrained('{base}-safetensors')" in text and f"model.name_or_path={base}-safetensors" in text


def test_a_shard_index_leaving_the_folder_is_refused_before_loading(tiny_models, tmp_path):
    base = base_copy(tiny_models, tmp_path)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (base / "model.safetensors").rename(outside / "model.safetensors")
    from safetensors import safe_open

    with safe_open(str(outside / "model.safetensors"), "pt") as file:
        names = list(file.keys())
    index = base / "model.safetensors.index.json"
    for target in ("../elsewhere/model.safetensors", "/etc/hostname"):
        index.write_text(json.dumps({"metadata": {}, "weight_map": {name: target for name in names}}))
        text = problems_for(base, tmp_path)
        assert (
            f"model.name_or_path: {base}: refers to '{target}', which lies outside the model folder; refusing to read "
            "it" in text
        )


# --- trainer.push_to_hub ----------------------------------------------------------------------------------------------


def test_trainer_push_to_hub_is_refused_with_the_push_command(tiny_models, tmp_path):
    text = problems_for(tiny_models["neo"], tmp_path, "+trainer.push_to_hub=true", "+trainer.hub_model_id=me/neo-legal")
    assert (
        "trainer.push_to_hub: training never uploads" in text
        and f"python -m finetune.push {tmp_path / 'run'} repo_id=me/neo-legal" in text
    )
    validate(compose("demo", tiny_overrides("neo", tiny_models["neo"], tmp_path / "run", "+trainer.push_to_hub=false")))
