"""What ``tunesmith eval`` asks: the ``--eval_dataset`` values turned into scorable items.

- ``identity``: the builtin held-out identity probes (:mod:`tunesmith.eval.probes`).
- ``retention``: the builtin general set (:mod:`tunesmith.eval.retention`).
- a data file or folder in any format the data layer reads (alpaca, query/response, messages,
  ShareGPT; .json/.jsonl/.csv/.parquet): the last assistant turn is the reference. ms-swift's
  ``general_qa:FILE`` (JSON Lines ``query``/``response``) is the same thing.
- ``general_mcq:FILE``, or any CSV with the columns ``question``, ``A``, ``B`` … and
  ``answer``: multiple choice, scored by the letter the model picks.
"""

from __future__ import annotations

import csv
import difflib
import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.data.readers import BadLine, decode, read_records
from tunesmith.data.sources import DataOptions, Loaded, load_spec, report_problems
from tunesmith.eval.metrics import is_chinese
from tunesmith.eval.probes import probe_items
from tunesmith.eval.retention import MAX_NEW_TOKENS, retention_items
from tunesmith.utils import UserError

BUILTIN = ("identity", "retention")
PREFIXES = ("general_qa", "general_mcq")
IDENTITY_MAX_NEW_TOKENS = 32  # the name (or the base identity) comes in the first sentence
LETTERS = "ABCDEFGHIJ"


@dataclass
class Item:
    """One question asked to every model, with what its answer is scored against."""

    dataset: str
    """``identity``, ``retention``, or the ``--eval_dataset`` value of a file."""
    id: str
    """Stable within the dataset (``zh-3``, ``en-arith-1``, ``file:line``)."""
    messages: list[dict[str, str]]
    """The prompt turns, ending with the user's question (system prompt added later)."""
    kind: str
    """identity, number, text, json, code, open, qa or mcq: which scorer applies."""
    lang: str = ""
    """zh or en (the subset a score is reported under)."""
    reference: str | None = None
    """The reference answer (open and qa items; the answer letter of mcq items)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Kind-specific data: the retention item's fields, the mcq options."""
    max_new_tokens: int | None = None
    """Answer length for this item (None: ``--max_new_tokens``)."""


def interleave(items: list[Item]) -> list[Item]:
    """zh and en items alternating (stable within a language), so that ``--eval_limit N``
    keeps both languages."""
    seen: dict[str, int] = {}
    rank = []
    for it in items:
        seen[it.lang] = seen.get(it.lang, 0) + 1
        rank.append(seen[it.lang])
    order = sorted(range(len(items)), key=lambda i: (rank[i], items[i].lang != "zh"))
    return [items[i] for i in order]


def identity_items() -> list[Item]:
    """The held-out identity probes as items, zh and en alternating."""
    counters: dict[str, int] = {}
    out = []
    for p in probe_items():
        counters[p["lang"]] = counters.get(p["lang"], 0) + 1
        msgs = [{"role": "user", "content": p["query"]}]
        out.append(Item("identity", f"{p['lang']}-{counters[p['lang']]}", msgs, "identity",
                        p["lang"], max_new_tokens=IDENTITY_MAX_NEW_TOKENS))  # fmt: skip
    return interleave(out)


def retention_set() -> list[Item]:
    """The builtin general set as items, zh and en alternating."""
    return interleave(
        [
            Item(
                "retention",
                r["id"],
                [{"role": "user", "content": r["query"]}],
                r["kind"],
                r["lang"],
                r.get("reference"),
                r,
                MAX_NEW_TOKENS[r["kind"]],
            )
            for r in retention_items()
        ]
    )


def qa_items(spec: str, path_spec: str, use_hf: bool, seed: int) -> list[Item]:
    """Records of a data file (any format of the data layer); the last assistant turn is the
    reference, which every record must have."""
    loaded = Loaded()
    convs = load_spec(path_spec, DataOptions(use_hf=use_hf, seed=seed), loaded)
    report_problems(loaded.problems, strict=True)
    out = []
    for conv in convs:
        msgs = conv.as_dicts()
        reference = msgs.pop()["content"]  # the converters guarantee a final assistant turn
        lang = "zh" if is_chinese(reference) or is_chinese(msgs[-1]["content"]) else "en"
        out.append(Item(spec, conv.origin, msgs, "qa", lang, reference))
    return out


def is_mcq_csv(path: Path) -> bool:
    """A CSV whose header has ``question``, ``answer`` and at least the options A and B."""
    if path.suffix.lower() != ".csv" or not path.is_file():
        return False
    header = next(csv.reader(io.StringIO(decode(path))), [])
    return {"question", "answer", "A", "B"} <= {h.strip() for h in header}


def mcq_prompt(question: str, options: dict[str, str]) -> str:
    """The question with its lettered options and an instruction to answer with the letter."""
    lines = [question.strip(), *(f"{k}. {v}" for k, v in options.items())]
    if is_chinese(question):
        lines.append("请只回答正确选项的字母。")
    else:
        lines.append("Answer with the letter of the correct option only.")
    return "\n".join(lines)


def mcq_items(spec: str, path: Path) -> list[Item]:
    """Rows of an ms-swift ``general_mcq`` CSV (``id,question,A,B,C,D,answer``) as items."""
    out = []
    problems = []
    for line, row in read_records(path):
        where = f"{path}:{line}"
        if isinstance(row, BadLine):
            problems.append(f"{where}: {row.message}")
            continue
        options = {k: row[k].strip() for k in LETTERS if (row.get(k) or "").strip()}
        question = (row.get("question") or "").strip()
        answer = (row.get("answer") or "").strip().upper()
        if not question:
            problems.append(f"{where}: question: empty")
        elif len(options) < 2:
            problems.append(f"{where}: expected at least the options A and B")
        elif answer not in options:
            problems.append(
                f"{where}: answer: expected one of {', '.join(options)}, got {row.get('answer')!r}"
            )
        else:
            msgs = [{"role": "user", "content": mcq_prompt(question, options)}]
            lang = "zh" if is_chinese(question) else "en"
            rid = (row.get("id") or "").strip() or str(line)
            out.append(Item(spec, rid, msgs, "mcq", lang, answer, {"options": options}, 16))
    if problems:
        shown = "\n  ".join(problems[:20])
        raise UserError(f"{len(problems)} bad row(s) in {path}:\n  {shown}")
    return out


def _split_prefix(spec: str) -> tuple[str | None, str]:
    for prefix in PREFIXES:
        if spec.startswith(prefix + ":"):
            return prefix, spec[len(prefix) + 1 :]
    return None, spec


def load_items(
    specs: list[str], limit: int | None, use_hf: bool = True, seed: int = 42
) -> list[Item]:
    """Every item of ``--eval_dataset``, the first ``limit`` of each dataset; bad input is one
    UserError, raised before any model is loaded."""
    if limit is not None and limit < 1:
        raise UserError(f"--eval_limit must be at least 1, got {limit}")
    if not specs:
        raise UserError("--eval_dataset: nothing to evaluate (e.g. identity retention FILE)")
    out: list[Item] = []
    for spec in dict.fromkeys(specs):  # a dataset named twice is scored once
        prefix, name = _split_prefix(spec)
        path = Path(name).expanduser()
        if prefix is None and spec == "identity":
            items = identity_items()
        elif prefix is None and spec == "retention":
            items = retention_set()
        elif prefix == "general_mcq" or (prefix is None and is_mcq_csv(path)):
            if not path.is_file():
                raise UserError(f"--eval_dataset {spec}: no such file")
            items = mcq_items(spec, path)
        elif path.exists() or prefix == "general_qa" or re.fullmatch(r"[\w.-]+/[\w.-]+", name):
            if not path.exists() and prefix == "general_qa":
                raise UserError(f"--eval_dataset {spec}: no such file")
            items = qa_items(spec, name, use_hf, seed)
        else:
            close = difflib.get_close_matches(spec, BUILTIN, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise UserError(
                f"--eval_dataset {spec}: not a file, a folder, or a dataset tunesmith knows "
                f"({', '.join(BUILTIN)}, general_qa:FILE, general_mcq:FILE){hint}"
            )
        if not items:
            raise UserError(f"--eval_dataset {spec}: no items to evaluate")
        out += items[:limit]
    return out
