"""finetune.data.sources: every format reads back the same rows, and every bad input says where and why."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from finetune.data.sources import ReadResult, Rejected, missing_sources, read_rows
from finetune.errors import DataError

ROWS = [
    {"instruction": "Say hi", "output": "hi"},
    {"instruction": 'Line one\nline "two", with a comma\tand a tab', "output": "multi"},
    {"instruction": "Übersetze: café 日本語 🙂", "output": "ünïcödé"},
]


@pytest.fixture
def offline_datasets(tmp_path, monkeypatch):
    """`datasets` offline, caching into tmp_path instead of the user's cache."""
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def write_table(path: Path, rows: list[dict], delimiter: str) -> Path:
    with path.open("w", encoding="utf-8", newline="") as file:
        writer = csv.writer(file, delimiter=delimiter)
        writer.writerow(list(rows[0]))
        writer.writerows([list(r.values()) for r in rows])
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow
    import pyarrow.parquet

    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), path)
    return path


WRITERS = {
    "jsonl": lambda d: write_jsonl(d / "rows.jsonl", ROWS),
    "json-array": lambda d: _write_json(d / "rows.json", ROWS),
    "json-columnar": lambda d: _write_json(d / "rows.json", {k: [r[k] for r in ROWS] for k in ROWS[0]}),
    "csv": lambda d: write_table(d / "rows.csv", ROWS, ","),
    "tsv": lambda d: write_table(d / "rows.tsv", ROWS, "\t"),
    "parquet": lambda d: write_parquet(d / "rows.parquet", ROWS),
}
WHERE = {  # where each of the 3 rows is; the CSV/TSV multi-line record starts on line 3, so the next is on 5
    "jsonl": [":1", ":2", ":3"],
    "json-array": [":[0]", ":[1]", ":[2]"],
    "json-columnar": [":[0]", ":[1]", ":[2]"],
    "csv": [":2", ":3", ":5"],
    "tsv": [":2", ":3", ":5"],
    "parquet": [":#1", ":#2", ":#3"],
}


def _write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")
    return path


def fields(result: ReadResult) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "_where"} for row in result.rows]


@pytest.mark.parametrize("fmt", list(WRITERS))
def test_every_format_reads_back_the_same_rows(tmp_path, fmt):
    path = WRITERS[fmt](tmp_path)
    result = read_rows(str(path))
    assert fields(result) == ROWS
    assert [row["_where"] for row in result.rows] == [f"{path}{w}" for w in WHERE[fmt]]
    assert result.rejected == [] and result.sources == [str(path)]


def test_dataset_folder_reads_splits(tmp_path, offline_datasets):
    folder = tmp_path / "ds"
    write_jsonl(folder / "data" / "train.jsonl", ROWS)
    write_jsonl(folder / "data" / "test.jsonl", ROWS[:1])
    train = read_rows(str(folder))
    assert fields(train) == ROWS
    assert train.rows[0]["_where"] == f"{folder}[train]#1" and train.sources == [str(folder)]
    assert fields(read_rows(str(folder), split="test")) == ROWS[:1]
    with pytest.raises(DataError, match=r"split 'validation'.*Unknown split.*train.*test.*data\.path"):
        read_rows(str(folder), split="validation")


def test_dataset_folder_with_configs(tmp_path, offline_datasets):
    folder = tmp_path / "ds"
    write_jsonl(folder / "en" / "train.jsonl", ROWS[:2])
    write_jsonl(folder / "fr" / "train.jsonl", ROWS[2:])
    (folder / "README.md").write_text(
        "---\nconfigs:\n"
        "- config_name: en\n  data_files:\n  - split: train\n    path: en/train.jsonl\n"
        "- config_name: fr\n  data_files:\n  - split: train\n    path: fr/train.jsonl\n"
        "---\n# two configs\n",
        encoding="utf-8",
    )
    assert fields(read_rows(str(folder), hub_config="en")) == ROWS[:2]
    assert fields(read_rows(str(folder), hub_config="fr")) == ROWS[2:]
    with pytest.raises(DataError, match=r"config de.*'en', 'fr'"):
        read_rows(str(folder), hub_config="de")


def test_hub_id_goes_to_the_hub_and_fails_offline_with_the_entry(tmp_path, offline_datasets, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"^someone/some-dataset \(config default, split 'train'\): cannot load"):
        read_rows("someone/some-dataset")


def test_glob_and_list_keep_order_and_list_sources(tmp_path):
    b = write_jsonl(tmp_path / "b.jsonl", ROWS[1:2])
    a = write_jsonl(tmp_path / "a.jsonl", ROWS[:1])
    c = write_table(tmp_path / "c.csv", ROWS[2:], ",")
    globbed = read_rows(str(tmp_path / "*.jsonl"))
    assert fields(globbed) == ROWS[:2] and globbed.sources == [str(a), str(b)]
    listed = read_rows([str(c), str(tmp_path / "[ab].jsonl")])
    assert fields(listed) == [ROWS[2], ROWS[0], ROWS[1]] and listed.sources == [str(c), str(a), str(b)]
    with pytest.raises(DataError, match=r"matches no files.*data\.path"):
        read_rows(str(tmp_path / "*.parquet"))


def test_column_mapping_renames_and_the_mapping_wins(tmp_path):
    path = write_table(tmp_path / "qa.csv", [{"question": "q", "answer": "a", "output": "old"}], ",")
    result = read_rows(str(path), columns={"instruction": "question", "output": "answer"})
    assert fields(result) == [{"instruction": "q", "output": "a"}]
    jsonl = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "n": 3}, {"other": None}])
    assert fields(read_rows(str(jsonl), columns={"instruction": "question"})) == [
        {"n": 3, "instruction": "q"},  # non-string values pass through
        {"other": None},  # a row without the column keeps what it has
    ]


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".json"])
def test_missing_mapped_column_suggests_the_closest(tmp_path, suffix):
    rows = [{"question": "q", "answer": "a"}]
    path = {
        ".csv": lambda: write_table(tmp_path / "qa.csv", rows, ","),
        ".parquet": lambda: write_parquet(tmp_path / "qa.parquet", rows),
        ".json": lambda: _write_json(tmp_path / "qa.json", {"question": ["q"], "answer": ["a"]}),
    }[suffix]()
    with pytest.raises(DataError) as err:
        read_rows(str(path), columns={"instruction": "questoin"})
    message = str(err.value)
    assert str(path) in message and "data.columns.instruction" in message and "'questoin'" in message
    assert "did you mean 'question'" in message and "question, answer" in message


def test_non_utf8_jsonl_line_is_rejected_and_the_rest_read(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"a": "1"}\n{"a": "caf\xe9"}\n\n{"a": "3"}\n')
    result = read_rows(str(path))
    assert fields(result) == [{"a": "1"}, {"a": "3"}]
    assert [r["_where"] for r in result.rows] == [f"{path}:1", f"{path}:4"]
    [bad] = result.rejected
    assert bad.where == f"{path}:2" and bad.reason == "not valid UTF-8 (byte 0xe9 at column 11)"
    assert bad.raw == '{"a": "caf\ufffd"}'


@pytest.mark.parametrize("suffix", [".csv", ".json"])
def test_non_utf8_csv_or_json_is_an_error_with_line_and_column(tmp_path, suffix):
    path = tmp_path / f"latin1{suffix}"
    text = "a,b\nx,y\nz,café\n" if suffix == ".csv" else '[\n{"a": "x"},\n{"a": "café"}\n]'
    path.write_bytes(text.encode("latin-1"))
    column = 6 if suffix == ".csv" else 11
    with pytest.raises(DataError, match=rf"latin1\{suffix}:3: not valid UTF-8 \(byte 0xe9 at column {column}\).*iconv"):
        read_rows(str(path))


def test_bad_jsonl_lines_are_each_rejected_with_their_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    lines = ['{"a": "ok"}', '{"a": "trunc', '{"a": 1,}', "[1]", '{"a": 1} {"b": 2}', '{"a": "ok too"}']
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = read_rows(str(path))
    assert [r["_where"] for r in result.rows] == [f"{path}:1", f"{path}:6"]
    assert [r.where for r in result.rejected] == [f"{path}:{n}" for n in (2, 3, 4, 5)]
    assert [r.raw for r in result.rejected] == lines[1:5]
    reasons = [r.reason for r in result.rejected]
    assert all(r.startswith("invalid JSON: ") for r in reasons[:2]) and "(column " in reasons[0]
    assert reasons[2] == "expected a JSON object, got list"
    assert reasons[3] == "invalid JSON: Extra data (column 10)"


def test_json_array_non_object_is_rejected_and_bad_json_is_an_error(tmp_path):
    path = _write_json(tmp_path / "rows.json", [{"a": "1"}, "text"])
    result = read_rows(str(path))
    assert fields(result) == [{"a": "1"}]
    assert result.rejected == [Rejected(f"{path}:[1]", "expected a JSON object, got str", '"text"', "not_an_object")]
    path.write_text('[\n{"a": 1},\n{"a": }\n]', encoding="utf-8")
    with pytest.raises(DataError, match=r"rows\.json:3: invalid JSON: .*\(column 7\)"):
        read_rows(str(path))
    _write_json(path, {"a": [1, 2], "b": [1]})
    with pytest.raises(DataError, match=r"'a' has 2, 'b' has 1"):
        read_rows(str(path))


def test_csv_record_with_wrong_field_count_is_rejected(tmp_path):
    path = tmp_path / "short.csv"
    path.write_text('a,b\n1,2\n"multi\nline"\n3,4,5\n6,\n', encoding="utf-8")
    result = read_rows(str(path))
    assert fields(result) == [{"a": "1", "b": "2"}, {"a": "6", "b": ""}]  # an empty cell is ""
    assert [(r.where, r.reason, r.raw) for r in result.rejected] == [
        (f"{path}:3", "expected 2 fields (as in the header), got 1", '"multi\nline"'),
        (f"{path}:5", "expected 2 fields (as in the header), got 3", "3,4,5"),
    ]


def test_unknown_suffix_missing_file_and_empty_file_are_errors(tmp_path):
    (tmp_path / "notes.docx").write_text("hello\n", encoding="utf-8")
    (tmp_path / "empty.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(
        DataError, match=r"notes\.docx: unsupported file type '\.docx'; use one of \.jsonl,.*data\.path"
    ):
        read_rows(str(tmp_path / "notes.docx"))
    with pytest.raises(DataError, match=r"nope\.jsonl: no such file.*\(data\.eval_path\)"):
        read_rows(str(tmp_path / "nope.jsonl"), key="data.eval_path")
    with pytest.raises(DataError, match=r"empty\.jsonl: no rows"):
        read_rows(str(tmp_path / "empty.jsonl"))


def test_text_files_are_one_document_each_for_continued_pretraining(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text(
        "First document.\n\nSecond paragraph, same document.\n", encoding="utf-8"
    )
    (tmp_path / "corpus" / "b.txt").write_text("Другой документ.\n", encoding="utf-8")
    (tmp_path / "corpus" / "c.txt").write_text("  \n", encoding="utf-8")
    result = read_rows(str(tmp_path / "corpus" / "*.txt"))
    assert fields(result) == [
        {"text": "First document.\n\nSecond paragraph, same document.\n"},
        {"text": "Другой документ.\n"},
    ]
    assert [r.where for r in result.rejected] == [f"{tmp_path / 'corpus' / 'c.txt'}:1"] and result.rejected[
        0
    ].kind == "empty"


def test_missing_sources(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "train.jsonl", ROWS)
    (tmp_path / "folder").mkdir()
    assert missing_sources(["train.jsonl", "*.jsonl", "folder", "owner/name", "EleutherAI/pile-v1.0"]) == []
    [no_match] = missing_sources("*.csv")
    assert no_match.startswith("data.path: '*.csv' matches no files") and str(tmp_path) in no_match
    [missing] = missing_sources(["train.jsonl", "data/train.jsonl"], key="data.eval_path")
    assert missing.startswith("data.eval_path: 'data/train.jsonl': no such file") and "owner/name" in missing
