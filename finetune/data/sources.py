"""Read rows from local files, reporting every bad line as `file:line: reason` before anything trains.

`datasets` reports a bad JSONL row as "in row 2" without file or line; we parse line by line ourselves so the
user can fix the file in one pass. JSONL and JSON (an array of objects) for now; CSV/TSV/Parquet and Hub ids come
with the data issue.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path

from finetune.errors import DataError

MAX_REPORTED = 20


def read_rows(path: str | Path, required: tuple[str, ...], optional: tuple[str, ...]) -> list[dict]:
    """All rows of `path`, each with its 1-based `_line`; raises DataError listing every bad row."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file (data.path)")
    if path.suffix == ".jsonl":
        rows, problems = _read_jsonl(path)
    elif path.suffix == ".json":
        rows, problems = _read_json(path)
    else:
        raise DataError(f"{path}: unsupported file type '{path.suffix}'; use .jsonl or .json (data.path)")
    for row in rows:
        problems.extend(_check_row(path, row, required, optional))
    if problems:
        shown = problems[:MAX_REPORTED]
        more = f"\n  ... and {len(problems) - MAX_REPORTED} more" if len(problems) > MAX_REPORTED else ""
        raise DataError(f"{len(problems)} bad row(s) in {path}:\n" + "\n".join(f"  {p}" for p in shown) + more)
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def _read_jsonl(path: Path) -> tuple[list[dict], list[str]]:
    rows, problems = [], []
    with path.open(encoding="utf-8-sig") as lines:  # -sig: a BOM on line 1 is not an error
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                problems.append(f"{path}:{number}:{err.colno}: invalid JSON: {err.msg}")
                continue
            if not isinstance(row, dict):
                problems.append(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
                continue
            rows.append({**row, "_line": number})
    return rows, problems


def _read_json(path: Path) -> tuple[list[dict], list[str]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as err:
        return [], [f"{path}:{err.lineno}:{err.colno}: invalid JSON: {err.msg}"]
    if not isinstance(data, list):
        return [], [f"{path}: expected a JSON array of objects"]
    rows, problems = [], []
    for index, row in enumerate(data):
        if isinstance(row, dict):
            rows.append({**row, "_line": f"[{index}]"})
        else:
            problems.append(f"{path}:[{index}]: expected a JSON object, got {type(row).__name__}")
    return rows, problems


def _check_row(path: Path, row: dict, required: tuple[str, ...], optional: tuple[str, ...]) -> list[str]:
    where = f"{path}:{row['_line']}"
    present = [k for k in row if k != "_line"]
    problems = []
    for name in required:
        value = row.get(name)
        if name not in row:
            close = difflib.get_close_matches(name, present, n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (row has: {', '.join(present)})"
            problems.append(f"{where}: missing field '{name}'{hint}")
        elif not isinstance(value, str):
            problems.append(f"{where}: field '{name}' must be a string, got {type(value).__name__}")
        elif not value.strip():
            problems.append(f"{where}: field '{name}' is empty")
    for name in optional:
        value = row.get(name)
        if value is not None and not isinstance(value, str):
            problems.append(f"{where}: field '{name}' must be a string or missing, got {type(value).__name__}")
    return problems
