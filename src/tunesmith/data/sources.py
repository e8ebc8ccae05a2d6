"""Where records come from, and how datasets are sampled, mixed and split.

A ``--dataset`` value is a local file or folder, the builtin ``self-cognition`` set, or a hub
id (``org/name``, ``org/name:subset``), each optionally ``#N`` (a seeded sample of N records).
Hub ids are looked up first in the local mirror ``$TUNESMITH_CACHE/datasets/org/name(.jsonl|
/)``, then through HF ``datasets`` (or ModelScope), which keep their own caches.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.data.formats import RecordError, RecordProblem, to_conversation
from tunesmith.data.messages import Conversation, Message
from tunesmith.data.readers import SUFFIXES, BadLine, read_records
from tunesmith.data.self_cognition import parse_name_pair, self_cognition_records
from tunesmith.options import DataOptions
from tunesmith.utils import UserError, cache_dir

BUILTIN_SELF_COGNITION = {"self-cognition", "swift/self-cognition", "self_cognition"}
MAX_SHOWN = 20


@dataclass
class Loaded:
    """Records of all sources, with the problems found on the way."""

    parts: list[tuple[str, list[Conversation]]] = field(default_factory=list)
    """(spec, its records) per ``--dataset`` value, in order."""
    problems: list[RecordProblem] = field(default_factory=list)
    """Every bad record, all sources together."""


def split_spec(spec: str) -> tuple[str, int | None]:
    """``'name#500'`` -> (``'name'``, 500); ``'name'`` -> (``'name'``, None)."""
    m = re.fullmatch(r"(.+)#(\d+)", spec)
    if m:
        return m.group(1), int(m.group(2))
    return spec, None


def sample(records: list[Any], n: int | None, seed: int) -> list[Any]:
    """A seeded random sample of ``n`` records; larger ``n`` repeats the data (as ms-swift)."""
    if n is None or not records:
        return records
    rng = random.Random(seed)
    whole, rest = divmod(n, len(records))
    return records * whole + rng.sample(records, rest)


def datasets_mirror() -> Path:
    """The local folder searched first for hub dataset ids (``org/name``)."""
    return cache_dir() / "datasets"


def _convert(
    rows: Any, origin: str, opts: DataOptions, loaded: Loaded, tag: str
) -> list[Conversation]:
    out = []
    for line, record in rows:
        where = f"{origin}:{line}"
        if isinstance(record, BadLine):
            loaded.problems.append(RecordProblem(where, "record", record.message))
            continue
        if opts.columns and isinstance(record, dict):
            record = {opts.columns.get(k, k): v for k, v in record.items()}
        try:
            conv = to_conversation(record, where, opts.fmt, opts.prompt_only)
        except RecordError as e:
            loaded.problems.append(RecordProblem(where, e.field, e.message))
            continue
        conv.tags["source"] = tag
        out.append(conv)
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


def _local_files(path: Path) -> list[Path]:
    if path.is_file():
        if path.suffix.lower() not in SUFFIXES:
            raise UserError(f"{path}: unsupported file type (expected {', '.join(SUFFIXES)})")
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
    if not files:
        raise UserError(f"{path}: the folder has no {', '.join(SUFFIXES)} files")
    return files


def _mirror(name: str) -> Path | None:
    base = datasets_mirror() / name
    if base.is_dir():
        return base
    for suffix in SUFFIXES:
        if (candidate := base.with_name(base.name + suffix)).is_file():
            return candidate
    return None


def _hub_rows(name: str, subset: str | None, use_hf: bool) -> Any:
    """Rows of a hub dataset's train split, or one clear sentence when it cannot be had."""
    where = datasets_mirror() / f"{name}.jsonl"
    hint = f"download it once online, or save it locally as {where}"
    errors = []
    if use_hf:
        try:
            import datasets

            ds = datasets.load_dataset(name, subset, split="train")
            return [(i, dict(r)) for i, r in enumerate(ds, 1)]
        except ImportError:
            errors.append("the 'datasets' package is not installed (pip install datasets)")
        except Exception as e:  # offline, unknown name, …: the hub raises many types
            errors.append(f"Hugging Face: {type(e).__name__}")
    try:
        from modelscope.msdatasets import MsDataset

        ds = MsDataset.load(name, subset_name=subset or "default", split="train")
        return [(i, dict(r)) for i, r in enumerate(ds, 1)]
    except ImportError:
        if not use_hf:
            errors.append("ModelScope is not installed (pip install modelscope)")
    except Exception as e:
        errors.append(f"ModelScope: {type(e).__name__}")
    raise UserError(f"dataset '{name}' is not available ({'; '.join(errors)}); {hint}")


def load_spec(spec: str, opts: DataOptions, loaded: Loaded) -> list[Conversation]:
    """Load one ``--dataset`` value with its ``#N`` sample; bad records go to ``loaded``."""
    name, n = split_spec(spec)
    path = Path(name).expanduser()
    if name in BUILTIN_SELF_COGNITION and not path.exists():
        records = builtin_self_cognition(opts.model_name, opts.model_author)
        for c in records:
            c.tags["source"] = spec
    elif path.exists():
        records = []
        for f in _local_files(path):
            records += _convert(read_records(f), str(f), opts, loaded, spec)
    elif name.startswith((".", "/", "~")) or path.suffix.lower() in SUFFIXES:
        raise UserError(f"--dataset {spec}: no such file or folder")
    elif (mirror := _mirror(name.split(":")[0])) is not None:
        records = []
        for f in _local_files(mirror):
            records += _convert(read_records(f), str(f), opts, loaded, spec)
    elif re.fullmatch(r"[\w.-]+/[\w.-]+(:[\w.-]+)?", name):
        repo, _, subset = name.partition(":")
        records = _convert(_hub_rows(repo, subset or None, opts.use_hf), repo, opts, loaded, spec)
    else:
        raise UserError(
            f"--dataset {spec}: not a local file or folder, 'self-cognition', or a hub id "
            "(org/name)"
        )
    return sample(records, n, opts.seed)


def report_problems(problems: list[RecordProblem], strict: bool) -> str | None:
    """Raise (strict) or describe (not strict) the bad records; None when there are none."""
    if not problems:
        return None
    shown = "\n  ".join(str(p) for p in problems[:MAX_SHOWN])
    more = f"\n  … and {len(problems) - MAX_SHOWN} more" if len(problems) > MAX_SHOWN else ""
    if strict:
        raise UserError(
            f"{len(problems)} bad record(s) in the dataset (fix them, or pass --strict false "
            f"to skip them):\n  {shown}{more}"
        )
    return f"skipped {len(problems)} bad record(s) (--strict false):\n  {shown}{more}"


def mix(
    parts: list[list[Conversation]], probs: list[float] | None, seed: int
) -> list[Conversation]:
    """Concatenate, or interleave by probability until the first source runs out."""
    if probs is None:
        return [c for p in parts for c in p]
    if len(probs) != len(parts):
        raise UserError(f"--dataset_probs has {len(probs)} values for {len(parts)} datasets")
    if any(p < 0 for p in probs) or sum(probs) <= 0:
        raise UserError("--dataset_probs must be non-negative and not all zero")
    rng = random.Random(seed)
    cursors = [0] * len(parts)
    out = []
    live = [i for i, p in enumerate(probs) if p > 0 and parts[i]]
    while live:
        i = rng.choices(live, weights=[probs[j] for j in live])[0]
        out.append(parts[i][cursors[i]])
        cursors[i] += 1
        if cursors[i] == len(parts[i]):
            break  # the first exhausted source ends the mix, so the proportions hold
    return out


def split_val(
    records: list[Conversation], ratio: float, seed: int
) -> tuple[list[Conversation], list[Conversation]]:
    """Hold out ``ratio`` of the records (at least one) for validation, chosen by ``seed``."""
    if ratio <= 0:
        return records, []
    if not 0 < ratio < 1:
        raise UserError(f"--split_dataset_ratio must be in [0, 1), got {ratio}")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    k = max(1, round(len(records) * ratio))
    val = set(order[:k])
    return [r for i, r in enumerate(records) if i not in val], [records[i] for i in sorted(val)]


def read_local(
    path: Path, problems: list[RecordProblem], opts: DataOptions | None = None
) -> list[Conversation]:
    """Conversations of one local file; its bad records are appended to ``problems``."""
    loaded = Loaded()
    out = _convert(read_records(Path(path)), str(path), opts or DataOptions(), loaded, str(path))
    problems.extend(loaded.problems)
    return out


def load_datasets(
    specs: list[str],
    *,
    model_name: list[str] | None = None,
    model_author: list[str] | None = None,
    use_hf: bool = True,
    seed: int = 42,
) -> list[Conversation]:
    """All ``specs`` concatenated, every bad record of every source reported in one error."""
    if not specs:
        raise UserError("no training data: pass --dataset FILE (or 'self-cognition')")
    opts = DataOptions(model_name=model_name, model_author=model_author, use_hf=use_hf, seed=seed)
    loaded = Loaded()
    out = [c for spec in specs for c in load_spec(spec, opts, loaded)]
    report_problems(loaded.problems, strict=True)
    if not out:
        raise UserError(f"the datasets {' '.join(specs)} contain no records")
    return out
