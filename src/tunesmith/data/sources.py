"""Where records come from: local files, the builtin self-cognition set, hub datasets.

``load_datasets`` turns the ``--dataset`` values into one list of ``Conversation``; every bad
record of every file is reported at once as ``file:line: field: problem``.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tunesmith.data.formats import RecordError, RecordProblem, to_conversation
from tunesmith.data.messages import Conversation, Message
from tunesmith.data.self_cognition import parse_name_pair, self_cognition_records
from tunesmith.utils import UserError, logger

BUILTIN_SELF_COGNITION = {"self-cognition", "swift/self-cognition", "self_cognition"}
LOCAL_SUFFIXES = {".json", ".jsonl"}
MAX_SHOWN = 20


def split_spec(spec: str) -> tuple[str, int | None]:
    """``'name#500'`` -> (``'name'``, 500); ``'name'`` -> (``'name'``, None)."""
    m = re.fullmatch(r"(.+)#(\d+)", spec)
    if m:
        return m.group(1), int(m.group(2))
    return spec, None


def sample(records: list[Any], n: int | None, seed: int) -> list[Any]:
    """A seeded random sample of ``n`` records; larger ``n`` repeats the data (as ms-swift)."""
    if n is None:
        return records
    if not records:
        return records
    rng = random.Random(seed)
    whole, rest = divmod(n, len(records))
    out = records * whole
    out += rng.sample(records, rest)
    return out


def _decode(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise UserError(
            f"{path}:{line}: not valid UTF-8 (byte 0x{raw[e.start]:02x}); save the file as UTF-8"
        ) from None


def _read_json_array(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    """Yield (line, element) of a top-level JSON array, keeping each element's line number."""
    decoder = json.JSONDecoder()
    i = _skip_ws(text, 0)
    if i >= len(text) or text[i] != "[":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg == "Extra data":  # JSON Lines saved under a .json name
                yield from _read_jsonl(path, text)
                return
            raise UserError(
                f"{path}:{e.lineno}: invalid JSON ({e.msg}, column {e.colno})"
            ) from None
        if isinstance(obj, dict):
            yield text[:i].count("\n") + 1, obj
            return
        raise UserError(f"{path}:1: expected a JSON array of records or JSON Lines")
    i = _skip_ws(text, i + 1)
    if i < len(text) and text[i] == "]":
        return
    while True:
        try:
            obj, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise UserError(
                f"{path}:{e.lineno}: invalid JSON ({e.msg}, column {e.colno})"
            ) from None
        yield text.count("\n", 0, i) + 1, obj
        i = _skip_ws(text, end)
        if i < len(text) and text[i] == ",":
            i = _skip_ws(text, i + 1)
            continue
        if i < len(text) and text[i] == "]":
            return
        line = text.count("\n", 0, i) + 1
        raise UserError(f"{path}:{line}: invalid JSON (expected ',' or ']' between records)")


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def _read_jsonl(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{n}: invalid JSON ({e.msg}, column {e.colno})") from None


def read_local(path: Path, problems: list[RecordProblem]) -> list[Conversation]:
    """Read a .json or .jsonl file; bad records are appended to ``problems``."""
    text = _decode(path)
    if not text.strip():
        raise UserError(f"{path}: the file is empty (expected records)")
    lines = _read_jsonl(path, text) if path.suffix == ".jsonl" else _read_json_array(path, text)
    out = []
    for line, record in lines:
        where = f"{path}:{line}"
        try:
            out.append(to_conversation(record, where))
        except RecordError as e:
            problems.append(RecordProblem(where, e.field, e.message))
    return out


def builtin_self_cognition(name: list[str] | None, author: list[str] | None) -> list[Conversation]:
    """The bilingual self-cognition set with ``--model_name`` / ``--model_author`` filled in."""
    if not name or not author:
        raise UserError(
            "the self-cognition dataset needs --model_name and --model_author "
            "(e.g. --model_name 小智 XiaoZhi --model_author 星河 Xinghe)"
        )
    try:
        names = parse_name_pair(name, ("", ""))
        authors = parse_name_pair(author, ("", ""))
    except (ValueError, TypeError) as e:
        raise UserError(f"--model_name/--model_author: {e}") from None
    out = []
    for i, r in enumerate(self_cognition_records(names, authors), 1):
        msgs = [Message("user", r["query"]), Message("assistant", r["response"])]
        out.append(Conversation(msgs, origin=f"self-cognition:{i}", tags={"lang": r["lang"]}))
    return out


def load_hub(name: str, use_hf: bool) -> list[Conversation]:
    """A hub dataset through HF ``datasets`` (ModelScope with ``use_hf=False``)."""
    try:
        import datasets
    except ImportError:
        raise UserError(
            f"--dataset {name}: not a local file; loading hub datasets needs the 'datasets' "
            "package (pip install datasets), or save the data as a local .jsonl file"
        ) from None
    try:
        subset = None
        if ":" in name:
            name, subset = name.split(":", 1)
        ds = datasets.load_dataset(name, subset, split="train")
    except Exception as e:
        raise UserError(
            f"--dataset {name}: could not load it from the hub ({type(e).__name__}); "
            "check the name and your connection, or pass a local .json/.jsonl copy"
        ) from None
    problems: list[RecordProblem] = []
    out = []
    for i, record in enumerate(ds, 1):
        try:
            out.append(to_conversation(dict(record), f"{name}:{i}"))
        except RecordError as e:
            problems.append(RecordProblem(f"{name}:{i}", e.field, e.message))
    raise_problems(problems)
    return out


def raise_problems(problems: list[RecordProblem]) -> None:
    """Raise one UserError listing the first problems and how many there are in all."""
    if not problems:
        return
    shown = "\n  ".join(str(p) for p in problems[:MAX_SHOWN])
    more = f"\n  … and {len(problems) - MAX_SHOWN} more" if len(problems) > MAX_SHOWN else ""
    raise UserError(f"{len(problems)} bad record(s) in the dataset:\n  {shown}{more}")


def load_dataset_spec(
    spec: str,
    *,
    model_name: list[str] | None,
    model_author: list[str] | None,
    use_hf: bool,
    seed: int,
) -> list[Conversation]:
    """Load one ``--dataset`` value (with its ``#N`` sample)."""
    name, n = split_spec(spec)
    path = Path(name).expanduser()
    problems: list[RecordProblem] = []
    if name in BUILTIN_SELF_COGNITION and not path.exists():
        records = builtin_self_cognition(model_name, model_author)
    elif path.is_file():
        if path.suffix not in LOCAL_SUFFIXES:
            raise UserError(f"--dataset {spec}: unsupported file type (expected .json or .jsonl)")
        records = read_local(path, problems)
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in LOCAL_SUFFIXES)
        if not files:
            raise UserError(f"--dataset {spec}: the folder has no .json or .jsonl files")
        records = [c for f in files for c in read_local(f, problems)]
    elif name.startswith((".", "/", "~")) or Path(name).suffix in LOCAL_SUFFIXES:
        raise UserError(f"--dataset {spec}: no such file")
    else:
        records = load_hub(name, use_hf)
    raise_problems(problems)
    return sample(records, n, seed)


def load_datasets(
    specs: list[str],
    *,
    model_name: list[str] | None,
    model_author: list[str] | None,
    use_hf: bool,
    seed: int,
) -> list[Conversation]:
    """All ``--dataset`` values concatenated; an empty result is an error, not a zero-step run."""
    if not specs:
        raise UserError("no training data: pass --dataset FILE (or 'self-cognition')")
    out: list[Conversation] = []
    for spec in specs:
        part = load_dataset_spec(
            spec, model_name=model_name, model_author=model_author, use_hf=use_hf, seed=seed
        )
        logger.info(f"dataset {spec}: {len(part)} records")
        out.extend(part)
    if not out:
        raise UserError(f"the datasets {' '.join(specs)} contain no records")
    return out
