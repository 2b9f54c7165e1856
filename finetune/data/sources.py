"""Read rows from files, globs, dataset folders and Hub ids, keeping where each row came from.

`datasets` reports a bad JSONL row as "in row 2" without file or line; we parse local files ourselves so every bad
row is reported as `file:line: reason` and the user can fix the file in one pass. Dataset folders (Hub layout) and
Hub ids go through `datasets.load_dataset`, the same call for both. `datasets` and `pyarrow` are imported inside the
functions that need them so importing the CLI stays fast.
"""

from __future__ import annotations

import codecs
import csv
import difflib
import glob
import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from finetune.errors import DataError

MAX_REPORTED = 20
MAX_RAW = 2000
SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".txt")
# An entry ending in one of these is a file path, never a Hub id, even though `data/train.txt` looks like owner/name.
FILE_SUFFIXES = (*SUFFIXES, ".gz", ".zip", ".arrow", ".xlsx")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
GLOB_CHARS = re.compile(r"[*?\[]")


@dataclass
class Rejected:
    """A record that could not be parsed into a dict; the caller writes these to a rejected-rows file."""

    where: str  # "path/to/file.jsonl:7", "path/to/file.csv:12" or "owner/name[train]#5"
    reason: str  # e.g. "invalid JSON: Expecting ',' delimiter (column 17)"
    raw: str  # the raw text of the line/record, truncated to MAX_RAW characters
    kind: str = "unreadable"  # not_utf8 | invalid_json | not_an_object | bad_record: the count key in the accounting


@dataclass
class ReadResult:
    """Everything read from a spec: good rows (each with "_where"), rejected records and the sources read."""

    rows: list[dict]
    rejected: list[Rejected]
    sources: list[str]


def read_rows(
    spec: str | list[str],
    *,
    columns: dict[str, str] | None = None,
    hub_config: str | None = None,
    split: str = "train",
    revision: str | None = None,
    key: str = "data.path",
) -> ReadResult:
    """Rows of every entry in `spec` (file, glob, dataset folder or Hub id), in order.

    `columns` maps a template field to the user's column ({"instruction": "question"}): the column is renamed to the
    field in every row. If a row has both the field and the mapped column, the mapped column wins (the field's own
    value is dropped), so a mapping always means what it says. Raises DataError for anything that stops a whole
    source from being read; single bad records come back in `rejected`.
    """
    entries = [spec] if isinstance(spec, str) else list(spec)
    if not entries:
        raise DataError(f"{key}: no data source given; set it to a file, glob, dataset folder or Hub id")
    result = ReadResult(rows=[], rejected=[], sources=[])
    for entry in entries:
        for source in _expand(entry, key):
            rows, rejected = _read_source(source, columns or {}, hub_config, split, revision, key)
            if not rows and not rejected:
                raise DataError(f"{source}: no rows ({key})")
            result.rows.extend(rows)
            result.rejected.extend(rejected)
            result.sources.append(source)
    return result


def missing_sources(spec: str | list[str], key: str = "data.path") -> list[str]:
    """One problem per entry that cannot name any data, so config validation can fail before anything loads."""
    entries = [spec] if isinstance(spec, str) else list(spec)
    if not entries:
        return [f"{key}: no data source given; set it to a file, glob, dataset folder or Hub id"]
    problems = []
    for entry in entries:
        path = os.path.expanduser(entry)
        if GLOB_CHARS.search(entry):
            if not _glob_files(path):
                problems.append(f"{key}: '{entry}' matches no files{_cwd_hint(path)}; fix the pattern")
        elif not (os.path.isfile(path) or os.path.isdir(path) or _is_hub_id(entry)):
            problems.append(
                f"{key}: '{entry}': no such file or folder{_cwd_hint(path)}; give an existing file, glob, "
                f"dataset folder or a Hub dataset id like owner/name"
            )
    return problems


def _expand(entry: str, key: str) -> list[str]:
    """The sources an entry stands for: the sorted files a glob matches, or the entry itself."""
    path = os.path.expanduser(entry)
    if GLOB_CHARS.search(entry):
        files = _glob_files(path)
        if not files:
            raise DataError(f"{entry}: matches no files{_cwd_hint(path)} ({key})")
        return files
    return [path]


def _glob_files(pattern: str) -> list[str]:
    return sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))


def _cwd_hint(path: str) -> str:
    return "" if os.path.isabs(path) else f" (relative to {Path.cwd()})"


def _is_hub_id(entry: str) -> bool:
    return bool(HUB_ID.match(entry)) and not entry.lower().endswith(FILE_SUFFIXES)


def _read_source(
    source: str, columns: dict[str, str], hub_config: str | None, split: str, revision: str | None, key: str
) -> tuple[list[dict], list[Rejected]]:
    """Dispatch one source to its reader and apply the column mapping."""
    suffix = Path(source).suffix.lower()
    if os.path.isdir(source) or (not os.path.exists(source) and _is_hub_id(source)):
        rows, rejected = _read_dataset(source, columns, hub_config, split, revision, key), []
    elif not os.path.isfile(source):
        raise DataError(f"{source}: no such file{_cwd_hint(source)} ({key})")
    elif suffix == ".jsonl":
        rows, rejected = _read_jsonl(source)
    elif suffix == ".json":
        rows, rejected = _read_json(source, columns, key)
    elif suffix in (".csv", ".tsv"):
        rows, rejected = _read_csv(source, "\t" if suffix == ".tsv" else ",", columns, key)
    elif suffix == ".parquet":
        rows, rejected = _read_parquet(source, columns, key), []
    elif suffix == ".txt":
        rows, rejected = _read_text(source, key)
    else:
        raise DataError(
            f"{source}: unsupported file type '{suffix}'; use one of {', '.join(SUFFIXES)}, "
            f"a dataset folder or a Hub id ({key})"
        )
    return [_rename(row, columns) for row in rows], rejected


def _rename(row: dict, columns: dict[str, str]) -> dict:
    """The row with each mapped column renamed to its field; the mapping wins over an existing field."""
    mapped = {field: row[column] for field, column in columns.items() if column in row}
    kept = {k: v for k, v in row.items() if k not in mapped and k not in columns.values()}
    return {**kept, **mapped}


def _check_columns(source: str, header: list[str], columns: dict[str, str], key: str) -> None:
    """For sources with a header or schema: every mapped column must exist, else say which and what is close."""
    problems = []
    for field, column in columns.items():
        if column not in header:
            close = difflib.get_close_matches(column, header, n=1, cutoff=0.6)
            hint = f"did you mean '{close[0]}'? " if close else ""
            problems.append(f"data.columns.{field}: column '{column}' not found ({hint}columns: {', '.join(header)})")
    if problems:
        raise DataError(f"{source} ({key}): " + "; ".join(problems))


def _decode(source: str, data: bytes, key: str) -> str:
    """The whole file as text; a non-UTF-8 byte is a DataError naming its line and column."""
    data = data.removeprefix(codecs.BOM_UTF8)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise DataError(
            f"{source}:{line}: not valid UTF-8 (byte 0x{data[err.start]:02x} at column {column}); re-encode the "
            f"file as UTF-8, e.g. `iconv -f latin1 -t utf-8 {source} > fixed{Path(source).suffix}` ({key})"
        ) from None


def _read_text(source: str, key: str) -> tuple[list[dict], list[Rejected]]:
    """A plain-text file is one document, {"text": its content}: a corpus folder (`data.path='corpus/*.txt'`) for
    continued pretraining with the completion template. An empty file is listed as a row that does not train."""
    text = _decode(source, Path(source).read_bytes(), key)
    if not text.strip():
        return [], [Rejected(f"{source}:1", "empty text file", "", "empty")]
    return [{"_where": f"{source}:1", "text": text}], []


def _read_jsonl(source: str) -> tuple[list[dict], list[Rejected]]:
    """One JSON object per line, decoded line by line so one bad line does not hide the rest."""
    rows, rejected = [], []
    with open(source, "rb") as lines:
        for number, line in enumerate(lines, start=1):
            if number == 1:
                line = line.removeprefix(codecs.BOM_UTF8)
            where = f"{source}:{number}"
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as err:
                raw = line.decode("utf-8", errors="replace").rstrip("\r\n")[:MAX_RAW]
                reason = f"not valid UTF-8 (byte 0x{line[err.start]:02x} at column {err.start + 1})"
                rejected.append(Rejected(where, reason, raw, "not_utf8"))
                continue
            if not text.strip():
                continue
            raw = text.rstrip("\r\n")[:MAX_RAW]
            try:
                row = json.loads(text)
            except json.JSONDecodeError as err:
                rejected.append(Rejected(where, f"invalid JSON: {err.msg} (column {err.colno})", raw, "invalid_json"))
                continue
            if not isinstance(row, dict):
                rejected.append(Rejected(where, f"expected a JSON object, got {type(row).__name__}", raw, "not_an_object"))
                continue
            rows.append({**row, "_where": where})
    return rows, rejected


def _read_json(source: str, columns: dict[str, str], key: str) -> tuple[list[dict], list[Rejected]]:
    """An array of objects, or an object of equal-length column lists; anything else cannot be read at all."""
    with open(source, "rb") as file:
        text = _decode(source, file.read(), key)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{source}:{err.lineno}: invalid JSON: {err.msg} (column {err.colno}) ({key})") from None
    if isinstance(data, list):
        rows, rejected = [], []
        for index, row in enumerate(data):
            where = f"{source}:[{index}]"
            if isinstance(row, dict):
                rows.append({**row, "_where": where})
            else:
                raw = json.dumps(row, ensure_ascii=False)[:MAX_RAW]
                rejected.append(Rejected(where, f"expected a JSON object, got {type(row).__name__}", raw, "not_an_object"))
        return rows, rejected
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise DataError(
            f"{source}: expected a JSON array of objects or an object of equal-length column lists "
            f'({{"column": [values, ...]}}), got {type(data).__name__} ({key}); for one object per line use .jsonl'
        )
    lengths = {name: len(values) for name, values in data.items()}
    if len(set(lengths.values())) > 1:
        listed = ", ".join(f"'{name}' has {n}" for name, n in lengths.items())
        raise DataError(f"{source}: column lists differ in length: {listed} ({key})")
    _check_columns(source, list(data), columns, key)
    count = next(iter(lengths.values()), 0)
    return [{**{name: data[name][i] for name in data}, "_where": f"{source}:[{i}]"} for i in range(count)], []


def _read_csv(source: str, delimiter: str, columns: dict[str, str], key: str) -> tuple[list[dict], list[Rejected]]:
    """A header row, then one record per row; `_where` is the line a (possibly multi-line) record starts on."""
    with open(source, "rb") as file:
        lines = io.StringIO(_decode(source, file.read(), key), newline="").readlines()
    reader = csv.reader(lines, delimiter=delimiter)
    header, rows, rejected = None, [], []
    start = 1
    try:
        for record in reader:
            first, start = start, reader.line_num + 1
            if not record:  # a blank line
                continue
            if header is None:
                header = record
                _check_columns(source, header, columns, key)
                continue
            where = f"{source}:{first}"
            if len(record) != len(header):
                raw = "".join(lines[first - 1 : reader.line_num]).rstrip("\r\n")[:MAX_RAW]
                reason = f"expected {len(header)} fields (as in the header), got {len(record)}"
                rejected.append(Rejected(where, reason, raw, "bad_record"))
                continue
            rows.append({**dict(zip(header, record)), "_where": where})
    except csv.Error as err:
        raise DataError(f"{source}:{start}: {err} ({key})") from None
    return rows, rejected


def _read_parquet(source: str, columns: dict[str, str], key: str) -> list[dict]:
    """All rows of a Parquet file; `_where` is the 1-based row number."""
    import pyarrow
    import pyarrow.parquet

    try:
        table = pyarrow.parquet.read_table(source)
    except (pyarrow.ArrowException, OSError) as err:
        raise DataError(f"{source}: cannot read as Parquet: {err} ({key})") from None
    _check_columns(source, table.column_names, columns, key)
    return [{**row, "_where": f"{source}:#{i}"} for i, row in enumerate(table.to_pylist(), start=1)]


def _read_dataset(
    entry: str, columns: dict[str, str], hub_config: str | None, split: str, revision: str | None, key: str
) -> list[dict]:
    """A dataset folder (Hub layout) or Hub id through `datasets.load_dataset`, the same call for both."""
    import datasets

    try:
        dataset = datasets.load_dataset(entry, hub_config, split=split, revision=revision)
    except Exception as err:  # load_dataset raises many types (offline, unknown split/config, bad files)
        message = " ".join(str(err).split())
        raise DataError(
            f"{entry} (config {hub_config or 'default'}, split '{split}'): cannot load dataset: "
            f"{type(err).__name__}: {message} ({key})"
        ) from None
    _check_columns(entry, dataset.column_names, columns, key)
    return [{**row, "_where": f"{entry}[{split}]#{i}"} for i, row in enumerate(dataset, start=1)]
