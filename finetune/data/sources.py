"""Read rows from files, globs, dataset folders and Hub ids, keeping where each row came from.

`datasets` reports a bad JSONL row as "in row 2" without file or line; we parse local files ourselves so every bad
row is reported as `file:line: reason` and the user can fix the file in one pass. Dataset folders (Hub layout) and
Hub ids go through `datasets.load_dataset`, the same call for both. `datasets` and `pyarrow` are imported inside the
functions that need them so importing the CLI stays fast.

Every source, whatever its format, is held to the same row rules: a row holding a NUL character (raw, or JSON's
`\u0000`) is a bad row (`nul_character`): text with NULs is binary or mis-encoded, and trains garbage silently; a
JSON object with the same key twice is a bad row naming the key (`duplicate_key`), since JSON keeps only the last
value. A JSONL line or CSV/TSV record larger than `data.max_row_bytes` is a bad row (`row_too_large`); JSONL is read
line by line in chunks, so a line over the cap is never held whole (only its first max_row_bytes). A file that
starts with a UTF-16/UTF-32 byte-order mark (Excel's "Unicode text") is read in that encoding, with a note; UTF-16
without a mark (every other byte NUL) is refused with the `iconv` command that converts it.
"""

from __future__ import annotations

import codecs
import csv
import glob
import io
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from finetune.errors import DataError, closest

MAX_REPORTED = 20
MAX_RAW = 2000
SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".txt")
# An entry ending in one of these is a file path, never a Hub id, even though `data/train.txt` looks like owner/name.
FILE_SUFFIXES = (*SUFFIXES, ".gz", ".zip", ".arrow", ".xlsx")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
GLOB_CHARS = re.compile(r"[*?\[]")
MAX_ROW_BYTES = 8 * 2**20  # data.max_row_bytes' default: about 2M tokens, far above any max_length short of chunking
CHUNK_BYTES = 2**20  # JSONL is read in pieces of this size, so one huge line never sits in memory whole
BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


@dataclass
class Rejected:
    """A record that could not be parsed into a dict; the caller writes these to a rejected-rows file."""

    where: str  # "path/to/file.jsonl:7", "path/to/file.csv:12" or "owner/name[train]#5"
    reason: str  # e.g. "invalid JSON: Expecting ',' delimiter (column 17)"
    raw: str  # the raw text of the line/record, truncated to MAX_RAW characters
    kind: str = "unreadable"  # not_utf8 | invalid_json | not_an_object | bad_record | row_too_large | nul_character |
    # duplicate_key: the count key in the accounting


@dataclass
class ReadResult:
    """Everything read from a spec: good rows (each with "_where"), rejected records and the sources read."""

    rows: list[dict]
    rejected: list[Rejected]
    sources: list[str]
    notes: list[str] = field(default_factory=list)  # how a source was read when that is worth saying (UTF-16)


def read_rows(
    spec: str | list[str],
    *,
    columns: dict[str, str] | None = None,
    hub_config: str | None = None,
    split: str = "train",
    revision: str | None = None,
    key: str = "data.path",
    max_row_bytes: int = MAX_ROW_BYTES,
) -> ReadResult:
    """Rows of every entry in `spec` (file, glob, dataset folder or Hub id), in order.

    `columns` maps a template field to the user's column ({"instruction": "question"}): the column is renamed to the
    field in every row. If a row has both the field and the mapped column, the mapped column wins (the field's own
    value is dropped), so a mapping always means what it says. Raises DataError for anything that stops a whole
    source from being read; single bad records come back in `rejected`. `max_row_bytes`: the largest JSONL line or
    CSV/TSV record read (data.max_row_bytes); a larger one is a rejected record.
    """
    entries = [spec] if isinstance(spec, str) else list(spec)
    if not entries:
        raise DataError(f"{key}: no data source given; set it to a file, glob, dataset folder or Hub id")
    result = ReadResult(rows=[], rejected=[], sources=[])
    for entry in entries:
        for source in _expand(entry, key):
            rows, rejected = _read_source(
                source, columns or {}, hub_config, split, revision, key, max_row_bytes, result.notes
            )
            if not rows and not rejected:
                raise DataError(f"{source}: no rows ({key})")
            result.rows.extend(rows)
            result.rejected.extend(rejected)
            result.sources.append(source)
    return result


def read_train_and_held_out(data_cfg, columns: dict) -> tuple[ReadResult, ReadResult]:
    """data.path's rows and the held-out source's (data.eval_path or data.eval_split of data.path; none: empty)."""
    train = _read_configured(data_cfg, data_cfg.path, data_cfg.split, "data.path", columns)
    if not (data_cfg.eval_path or data_cfg.eval_split):
        return train, ReadResult([], [], [])
    source, split = data_cfg.eval_path or data_cfg.path, data_cfg.eval_split or data_cfg.split
    return train, _read_configured(data_cfg, source, split, "data.eval_path", columns)


def _read_configured(data_cfg, spec, split, key, columns) -> ReadResult:
    return read_rows(
        spec,
        columns=columns,
        hub_config=data_cfg.hub_config,
        split=split,
        revision=data_cfg.revision,
        key=key,
        max_row_bytes=data_cfg.get("max_row_bytes") or MAX_ROW_BYTES,  # a run recorded before the key has none
    )


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
    source: str,
    columns: dict[str, str],
    hub_config: str | None,
    split: str,
    revision: str | None,
    key: str,
    max_row_bytes: int = MAX_ROW_BYTES,
    notes: list[str] | None = None,
) -> tuple[list[dict], list[Rejected]]:
    """Dispatch one source to its reader, hold its rows to the row rules (NUL, duplicate keys) and apply the column
    mapping."""
    notes = [] if notes is None else notes
    suffix = Path(source).suffix.lower()
    if os.path.isdir(source) or (not os.path.exists(source) and _is_hub_id(source)):
        rows, rejected = _read_dataset(source, columns, hub_config, split, revision, key), []
    elif not os.path.isfile(source):
        raise DataError(f"{source}: no such file{_cwd_hint(source)} ({key})")
    elif suffix == ".jsonl":
        rows, rejected = _read_jsonl(source, max_row_bytes, key, notes)
    elif suffix == ".json":
        rows, rejected = _read_json(source, columns, key, notes)
    elif suffix in (".csv", ".tsv"):
        rows, rejected = _read_csv(source, "\t" if suffix == ".tsv" else ",", columns, key, max_row_bytes, notes)
    elif suffix == ".parquet":
        rows, rejected = _read_parquet(source, columns, key), []
    elif suffix == ".txt":
        rows, rejected = _read_text(source, key, notes)
    else:
        raise DataError(
            f"{source}: unsupported file type '{suffix}'; use one of {', '.join(SUFFIXES)}, "
            f"a dataset folder or a Hub id ({key})"
        )
    kept = []
    for row in rows:
        problem = _row_problem(row)
        if problem:
            raw = json.dumps({k: v for k, v in row.items() if k != "_where"}, ensure_ascii=False, default=str)[:MAX_RAW]
            rejected.append(Rejected(row["_where"], problem[1], raw, problem[0]))
        else:
            kept.append(_rename(row, columns))
    return kept, rejected


class _Duplicated(dict):
    """A JSON object that named a key more than once (json keeps the last value): `duplicate` is the first such key."""

    duplicate = ""


def _object(pairs: list[tuple]) -> dict:
    """json's object_pairs_hook: the object, marked when a key repeats, so the row can be refused naming the key."""
    obj = dict(pairs)
    if len(obj) == len(pairs):
        return obj
    seen: set = set()
    marked = _Duplicated(obj)
    marked.duplicate = next(k for k, _ in pairs if k in seen or seen.add(k))
    return marked


_DECODER = json.JSONDecoder(object_pairs_hook=_object)  # one decoder: json.loads(..., hook) builds one per call


def _row_problem(value, at: str = "") -> tuple[str, str] | None:
    """(kind, reason) for the first thing in a row that must not train silently: a NUL character in any string, or a
    JSON object that repeated a key; None for a clean row. (A loop over plain values: it runs for every row.)"""
    if isinstance(value, str):
        if "\x00" in value:
            return "nul_character", (
                f"NUL character (U+0000) in '{at}' at character {value.index(chr(0)) + 1}: the text is "
                "binary or mis-encoded (UTF-16 read as UTF-8?); remove the NULs or fix the encoding"
            )
        return None
    if isinstance(value, dict):
        if isinstance(value, _Duplicated):
            inside = f" in '{at}'" if at else ""
            return "duplicate_key", (
                f"duplicate key '{value.duplicate}'{inside}: JSON keeps only the last value; "
                "remove or rename one of them"
            )
        for k, v in value.items():
            if (
                (type(v) is str and "\x00" not in v)
                or v is None
                or type(v) in (int, float, bool)
                or (k == "_where" and not at)
            ):
                continue
            problem = _row_problem(v, f"{at}.{k}" if at else str(k))
            if problem:
                return problem
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            problem = _row_problem(v, f"{at}[{i}]")
            if problem:
                return problem
    return None


def _rename(row: dict, columns: dict[str, str]) -> dict:
    """The row with each mapped column renamed to its field; the mapping wins over an existing field."""
    mapped = {field: row[column] for field, column in columns.items() if column in row}
    kept = {k: v for k, v in row.items() if k not in mapped and k not in columns.values()}
    return {**kept, **mapped}


def _check_columns(source: str, header: list[str], columns: dict[str, str], key: str) -> None:
    """For sources with a header or schema: every mapped column must exist, else say which and what is close."""
    problems = []
    for name, column in columns.items():
        if column not in header:
            close = closest(column, header)
            hint = f"did you mean '{close[0]}'? " if close else ""
            problems.append(f"data.columns.{name}: column '{column}' not found ({hint}columns: {', '.join(header)})")
    if problems:
        raise DataError(f"{source} ({key}): " + "; ".join(problems))


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def _bom_encoding(source: str, head: bytes, key: str) -> str | None:
    """utf-16 / utf-32 when the file starts with that byte-order mark (Excel's "Unicode text" is UTF-16 with one),
    None for UTF-8; UTF-16 without a mark (every other byte NUL: ASCII text in UTF-16) is a DataError with the fix."""
    for bom, encoding in BOMS:
        if head.startswith(bom):
            return encoding
    sample = head[: len(head) & ~1]
    half = len(sample) // 2
    if half >= 2:
        even, odd = sample[0::2].count(0), sample[1::2].count(0)
        order = (
            "UTF-16LE"
            if odd >= 0.3 * half and even <= 0.02 * half
            else "UTF-16BE"
            if even >= 0.3 * half and odd <= 0.02 * half
            else None
        )
        if order:
            fixed = Path(source).with_suffix(".utf8" + Path(source).suffix)
            raise DataError(
                f"{source}: looks like {order} text without a byte-order mark ({max(even, odd)} of its first {half} "
                f"characters have a NUL byte); convert it to UTF-8: `iconv -f {order} -t UTF-8 {source} > {fixed}` "
                f"and use {fixed.name} ({key})"
            )
    return None


def _decode(source: str, data: bytes, key: str, notes: list[str] | None = None) -> str:
    """The whole file as text; a non-UTF-8 byte is a DataError naming its line and column. A file with a UTF-16 or
    UTF-32 byte-order mark is decoded in that encoding (and a note says so)."""
    encoding = _bom_encoding(source, data[:4096], key)
    if encoding:
        try:
            text = data.decode(encoding)  # the codec reads the mark and drops it
        except UnicodeDecodeError as err:
            raise DataError(
                f"{source}: starts with a {encoding.upper()} byte-order mark but is not valid {encoding.upper()} "
                f"({err.reason} at byte {err.start}); re-save it as UTF-8 ({key})"
            ) from None
        if notes is not None:
            notes.append(f"{source}: read as {encoding.upper()} (it starts with that byte-order mark)")
        return text
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


def _read_text(source: str, key: str, notes: list[str]) -> tuple[list[dict], list[Rejected]]:
    """A plain-text file is one document, {"text": its content}: a corpus folder (`data.path='corpus/*.txt'`) for
    continued pretraining with the completion template. An empty file is listed as a row that does not train."""
    text = _decode(source, Path(source).read_bytes(), key, notes)
    if not text.strip():
        return [], [Rejected(f"{source}:1", "empty text file", "", "empty")]
    return [{"_where": f"{source}:1", "text": text}], []


def _lines(source: str, max_bytes: int, key: str, notes: list[str]) -> Iterator[tuple[int, bytes | None, int, bytes]]:
    """(number, line as UTF-8 bytes or None when longer than max_bytes, its size in bytes, its start (at least
    MAX_RAW bytes of it)) for each line of a file, read CHUNK_BYTES at a time: a line over the cap is never held
    whole, only its first max_bytes until the cap is passed. A file with a UTF-16/UTF-32 byte-order mark is read in
    its encoding."""
    with open(source, "rb") as file:
        encoding = _bom_encoding(source, file.read(4096), key)
        file.seek(0)
        if encoding:
            notes.append(f"{source}: read as {encoding.upper()} (it starts with that byte-order mark)")
            text = io.TextIOWrapper(file, encoding=encoding, newline="")

            def read() -> bytes:
                try:
                    return text.readline(CHUNK_BYTES // 4).encode("utf-8", errors="surrogatepass")
                except UnicodeDecodeError as err:
                    raise DataError(
                        f"{source}: not valid {encoding.upper()} after line {number} ({err.reason}); re-save "
                        f"it as UTF-8 ({key})"
                    ) from None
        else:
            if file.read(3) != codecs.BOM_UTF8:
                file.seek(0)

            def read() -> bytes:
                return file.readline(CHUNK_BYTES)

        number = 0
        while chunk := read():
            number += 1
            if chunk.endswith(b"\n") and len(chunk) <= max_bytes:  # the usual line: one piece
                yield number, chunk, len(chunk), chunk
                continue
            line: bytearray | None = bytearray(chunk) if len(chunk) <= max_bytes else None
            head, size = bytes(chunk[:MAX_RAW]), len(chunk)
            while not chunk.endswith(b"\n") and (chunk := read()):
                size += len(chunk)
                if line is not None and size > max_bytes:
                    line = None  # over the cap: the rest of the line is only counted
                elif line is not None:
                    line += chunk
            yield number, (bytes(line) if line is not None else None), size, head


def _read_jsonl(
    source: str, max_bytes: int = MAX_ROW_BYTES, key: str = "data.path", notes: list[str] | None = None
) -> tuple[list[dict], list[Rejected]]:
    """One JSON object per line, decoded line by line so one bad line does not hide the rest."""
    rows, rejected = [], []
    for number, line, size, head in _lines(source, max_bytes, key, [] if notes is None else notes):
        where = f"{source}:{number}"
        if line is None:
            raw = head[:MAX_RAW].decode("utf-8", errors="replace")
            reason = (
                f"line of {_mib(size)} exceeds data.max_row_bytes={max_bytes} ({_mib(max_bytes)}); raise "
                f"data.max_row_bytes to read it, or remove the line"
            )
            rejected.append(Rejected(where, reason, raw, "row_too_large"))
            continue
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
            row = _DECODER.decode(text)
        except json.JSONDecodeError as err:
            rejected.append(Rejected(where, f"invalid JSON: {err.msg} (column {err.colno})", raw, "invalid_json"))
            continue
        if not isinstance(row, dict):
            rejected.append(Rejected(where, f"expected a JSON object, got {type(row).__name__}", raw, "not_an_object"))
            continue
        rows.append(_with_where(row, where))
    return rows, rejected


def _with_where(row: dict, where: str) -> dict:
    """The row plus its `_where`, keeping the duplicate-key mark for the row rules."""
    if isinstance(row, _Duplicated):
        marked = _Duplicated(row, _where=where)
        marked.duplicate = row.duplicate
        return marked
    return {**row, "_where": where}


def _read_json(
    source: str, columns: dict[str, str], key: str, notes: list[str] | None = None
) -> tuple[list[dict], list[Rejected]]:
    """An array of objects, or an object of equal-length column lists; anything else cannot be read at all."""
    with open(source, "rb") as file:
        text = _decode(source, file.read(), key, notes)
    try:
        data = _DECODER.decode(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{source}:{err.lineno}: invalid JSON: {err.msg} (column {err.colno}) ({key})") from None
    if isinstance(data, list):
        rows, rejected = [], []
        for index, row in enumerate(data):
            where = f"{source}:[{index}]"
            if isinstance(row, dict):
                rows.append(_with_where(row, where))
            else:
                raw = json.dumps(row, ensure_ascii=False)[:MAX_RAW]
                rejected.append(
                    Rejected(where, f"expected a JSON object, got {type(row).__name__}", raw, "not_an_object")
                )
        return rows, rejected
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise DataError(
            f"{source}: expected a JSON array of objects or an object of equal-length column lists "
            f'({{"column": [values, ...]}}), got {type(data).__name__} ({key}); for one object per line use .jsonl'
        )
    if isinstance(data, _Duplicated):
        raise DataError(
            f"{source}: column '{data.duplicate}' is given twice (JSON keeps only the last list); remove or "
            f"rename one ({key})"
        )
    lengths = {name: len(values) for name, values in data.items()}
    if len(set(lengths.values())) > 1:
        listed = ", ".join(f"'{name}' has {n}" for name, n in lengths.items())
        raise DataError(f"{source}: column lists differ in length: {listed} ({key})")
    _check_columns(source, list(data), columns, key)
    count = next(iter(lengths.values()), 0)
    return [{**{name: data[name][i] for name in data}, "_where": f"{source}:[{i}]"} for i in range(count)], []


def _read_csv(
    source: str,
    delimiter: str,
    columns: dict[str, str],
    key: str,
    max_bytes: int = MAX_ROW_BYTES,
    notes: list[str] | None = None,
) -> tuple[list[dict], list[Rejected]]:
    """A header row, then one record per row; `_where` is the line a (possibly multi-line) record starts on. A record
    over `max_bytes` is a rejected record (the csv module's own 128 KiB field limit, which stops the whole file, is
    lifted while reading)."""
    with open(source, "rb") as file:
        text = _decode(source, file.read(), key, notes)
    lines = io.StringIO(text, newline="").readlines()
    reader = csv.reader(lines, delimiter=delimiter)
    header, rows, rejected = None, [], []
    start = 1
    limit = csv.field_size_limit()
    csv.field_size_limit(max(limit, len(text) + 1))  # no field can be longer than the file
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
            record_lines = lines[first - 1 : reader.line_num]
            if sum(map(len, record_lines)) * 4 > max_bytes:  # a UTF-8 character is at most 4 bytes: count only then
                size = sum(len(line.encode("utf-8", errors="surrogatepass")) for line in record_lines)
                if size > max_bytes:
                    reason = (
                        f"record of {_mib(size)} exceeds data.max_row_bytes={max_bytes} ({_mib(max_bytes)}); raise "
                        f"data.max_row_bytes to read it, or remove it"
                    )
                    rejected.append(Rejected(where, reason, record_lines[0][:MAX_RAW].rstrip("\r\n"), "row_too_large"))
                    continue
            if len(record) != len(header):
                raw = "".join(record_lines).rstrip("\r\n")[:MAX_RAW]
                reason = f"expected {len(header)} fields (as in the header), got {len(record)}"
                rejected.append(Rejected(where, reason, raw, "bad_record"))
                continue
            rows.append({**dict(zip(header, record)), "_where": where})
    except csv.Error as err:
        raise DataError(f"{source}:{start}: {err} ({key})") from None
    finally:
        csv.field_size_limit(limit)
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
