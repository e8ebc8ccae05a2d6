"""Read local data files as (line, raw record) pairs: .json, .jsonl, .csv, .parquet.

Line numbers are 1-based lines of the file where each record starts (rows for Parquet), so
every problem can be reported as ``file:line``. Unreadable files raise ``UserError``.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tunesmith.utils import UserError

SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
# Python's json refuses integers over this many digits with a ValueError, and very deep
# nesting with a RecursionError: both are bad input, reported like any JSON error.
JSON_ERRORS = (json.JSONDecodeError, ValueError, RecursionError)


class BadLine:
    """A JSON Lines line that is not JSON, or a CSV row that does not fit the header: one bad
    record among the others."""

    def __init__(self, message: str) -> None:
        self.message = message


def decode(path: Path) -> str:
    """The file's text: UTF-8 (a BOM is allowed); other encodings name the first bad line."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read the file ({e.strerror})") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise UserError(
            f"{path}:{line}: not valid UTF-8 (byte 0x{raw[e.start]:02x}); save the file as UTF-8"
        ) from None


def read_records(path: Path) -> Iterator[tuple[int, Any]]:
    """Yield ``(line, record)`` for every record of a supported file."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        yield from _parquet(path)
        return
    text = decode(path)
    if not text.strip():
        raise UserError(f"{path}: the file is empty (expected records)")
    if suffix == ".jsonl":
        yield from _jsonl(path, text)
    elif suffix == ".csv":
        yield from _csv(path, text)
    else:
        yield from _json(path, text)


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def _json_error(path: Path, e: Exception, line: int) -> UserError:
    if isinstance(e, json.JSONDecodeError):
        return UserError(f"{path}:{e.lineno}: invalid JSON ({_describe(e)})")
    return UserError(f"{path}:{line}: invalid JSON ({_describe(e)})")


def _describe(e: Exception) -> str:
    if isinstance(e, json.JSONDecodeError):  # some messages end in "at" already
        return f"{e.msg.removesuffix(' at')} at column {e.colno}"
    if isinstance(e, RecursionError):
        return "nested too deeply"
    return str(e).split(";")[0]


def _json(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    """A top-level JSON array, element by element so each keeps its line number."""
    decoder = json.JSONDecoder()
    i = _skip_ws(text, 0)
    if text[i] != "[":
        try:
            obj = json.loads(text)
        except JSON_ERRORS as e:
            if isinstance(e, json.JSONDecodeError) and e.msg == "Extra data":
                yield from _jsonl(path, text)  # JSON Lines saved under a .json name
                return
            raise _json_error(path, e, text.count("\n", 0, i) + 1) from None
        if isinstance(obj, dict):
            yield text.count("\n", 0, i) + 1, obj
            return
        raise UserError(f"{path}:1: expected a JSON array of records, or one record per line")
    i = _skip_ws(text, i + 1)
    if i < len(text) and text[i] == "]":
        return
    while True:
        line = text.count("\n", 0, i) + 1
        try:
            obj, end = decoder.raw_decode(text, i)
        except JSON_ERRORS as e:
            raise _json_error(path, e, line) from None
        yield line, obj
        i = _skip_ws(text, end)
        if i < len(text) and text[i] == ",":
            i = _skip_ws(text, i + 1)
            continue
        if i < len(text) and text[i] == "]":
            rest = _skip_ws(text, i + 1)
            if rest < len(text):
                line = text.count("\n", 0, rest) + 1
                raise UserError(
                    f"{path}:{line}: invalid JSON (unexpected text after the closing ']')"
                )
            return
        line = text.count("\n", 0, i) + 1
        raise UserError(f"{path}:{line}: invalid JSON (expected ',' or ']' after a record)")


def _jsonl(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    # split("\n"), not splitlines(): JSON strings may hold raw U+2028/U+0085, which
    # splitlines() would treat as line ends.
    for n, line in enumerate(text.split("\n"), 1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except JSON_ERRORS as e:
            record = BadLine(f"invalid JSON ({_describe(e)})")
        yield n, record


def _csv(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # default 128 KiB; a C long on Windows
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if not reader.fieldnames:
        raise UserError(f"{path}:1: the CSV file has no header row")
    start = 2
    try:
        for row in reader:
            extra = row.pop(None, None)  # type: ignore[call-overload]
            if extra:
                n = len(reader.fieldnames)
                yield start, BadLine(f"{len(extra)} more value(s) than the header's {n} columns")
            else:
                yield start, {k: v for k, v in row.items() if v is not None}
            start = reader.line_num + 1
    except csv.Error as e:
        raise UserError(f"{path}:{start}: invalid CSV ({e})") from None


def _parquet(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises many types for a damaged file
        raise UserError(f"{path}: not a readable Parquet file ({type(e).__name__})") from None
    yield from enumerate(table.to_pylist(), 1)
