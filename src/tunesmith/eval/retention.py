"""Retention: the builtin general set, to see what a fine-tune made the model forget.

``data/builtin/retention.jsonl`` holds 96 questions written for this project (48 Chinese, 48
English; 76 scored exactly, 20 open), disjoint from every training set tunesmith ships. Each
line is one item:

- ``number``: arithmetic or unit conversion, ``answer`` a number; the answer passes when its
  first or last number equals it ("17 * 23 = 391" and "391" both pass).
- ``text``: a fact, ``answers`` the accepted spellings; passes when one of them appears.
- ``json``: a JSON object with the given ``keys`` (and ``values``); the first ``{…}`` of the
  answer (code fences allowed) must parse, have exactly those keys and those values.
- ``code``: a short Python program; the answer's code is run (``run_code``) and must print
  ``stdout``.
- ``open``: an explanation scored by ROUGE-L F1 (per character for Chinese) and BLEU-4 against
  ``reference``.

An item scores 0–100 (exact kinds 0 or 100, open items their ROUGE-L); the retention score is
the mean over items, so base and tuned model are compared on one number.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import tempfile
from importlib import resources
from typing import Any

from tunesmith.eval.metrics import rouge, sentence_bleu

EXACT_KINDS = ("number", "text", "json", "code")
KINDS = (*EXACT_KINDS, "open")
MAX_NEW_TOKENS = {"number": 32, "text": 32, "json": 48, "code": 80, "open": 48}
"""Answer length per kind: enough for a correct answer, so the eval stays fast on a CPU."""
CODE_TIMEOUT_S = 5.0

_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")
_FENCE = re.compile(r"```[\w+-]*\n(.*?)(?:```|$)", re.S)


def retention_items() -> list[dict[str, Any]]:
    """The builtin general set, one dict per item (``id``, ``lang``, ``kind``, ``query`` and
    the kind's answer fields), in file order."""
    text = resources.files("tunesmith.data.builtin").joinpath("retention.jsonl")
    return [json.loads(line) for line in text.read_text(encoding="utf-8").splitlines() if line]


def numbers(text: str) -> list[float]:
    """The numbers written in ``text`` ("3,500" is 3500)."""
    return [float(m.replace(",", "")) for m in _NUMBER.findall(text)]


def _same_number(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)


def score_number(answer: str, expected: float) -> bool:
    """The first or the last number of the answer equals ``expected``."""
    found = numbers(answer)
    return bool(found) and (_same_number(found[0], expected) or _same_number(found[-1], expected))


def score_text(answer: str, accepted: list[str]) -> bool:
    """One of the accepted spellings appears in the answer (case-insensitive)."""
    low = answer.lower()
    return any(a.lower() in low for a in accepted)


def extract_json(answer: str) -> Any:
    """The first JSON object of the answer (inside a code fence or not), or None."""
    for block in [*_FENCE.findall(answer), answer]:
        start = block.find("{")
        while start != -1:
            try:
                return json.JSONDecoder().raw_decode(block[start:])[0]
            except json.JSONDecodeError:
                start = block.find("{", start + 1)
    return None


def _equal(value: Any, expected: Any) -> bool:
    if isinstance(expected, (int, float)) and not isinstance(expected, bool):
        try:
            return _same_number(float(value), float(expected))
        except (TypeError, ValueError):
            return False
    return str(value).strip() == str(expected)


def score_json(answer: str, keys: list[str], values: dict[str, Any] | None) -> bool:
    """The answer holds a JSON object with exactly ``keys`` and the ``values`` given."""
    obj = extract_json(answer)
    if not isinstance(obj, dict) or set(obj) != set(keys):
        return False
    return all(_equal(obj[k], v) for k, v in (values or {}).items())


def extract_code(answer: str) -> str:
    """The first fenced code block of the answer, else the whole answer."""
    blocks = _FENCE.findall(answer)
    return blocks[0] if blocks else answer


def _limits() -> None:  # runs in the child before exec: no runaway memory, CPU or files
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
    resource.setrlimit(resource.RLIMIT_CPU, (5, 5))
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))


def run_code(code: str, timeout: float = CODE_TIMEOUT_S) -> str | None:
    """Run model-written Python and return what it printed (None if it failed or timed out).

    It runs in a fresh interpreter in isolated mode (``-I``: no user site, no environment
    variables, no current directory on the path), in an empty temporary folder, with stdin
    closed, a wall-clock timeout and, on POSIX, limits on memory, CPU time and file size. This
    bounds mistakes of a small model; it is not a sandbox against hostile code, so only score
    models you would run locally anyway.
    """
    with tempfile.TemporaryDirectory(prefix="tunesmith-code-") as tmp:
        try:
            done = subprocess.run(
                [sys.executable, "-I", "-c", code],
                cwd=tmp,
                env={"PATH": os.defpath, "PYTHONHASHSEED": "0"},
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
                preexec_fn=_limits if os.name == "posix" else None,
            )
        except subprocess.TimeoutExpired:
            return None
    return done.stdout if done.returncode == 0 else None


def score_code(answer: str, expected_stdout: str) -> bool:
    """The answer's code runs and prints ``expected_stdout`` (surrounding space ignored)."""
    out = run_code(extract_code(answer))
    return out is not None and out.strip() == expected_stdout.strip()


def score_item(item: dict[str, Any], answer: str) -> dict[str, Any]:
    """Score one answer: ``{"score": 0–100, "passed": bool}`` plus BLEU/ROUGE for open items."""
    kind = item["kind"]
    if kind == "open":
        r = rouge(answer, item["reference"])
        bleu = sentence_bleu(answer, item["reference"])
        return {"score": r["rougeL"], "passed": None, "rouge-l": r["rougeL"], "bleu-4": bleu}
    if kind == "number":
        ok = score_number(answer, float(item["answer"]))
    elif kind == "text":
        ok = score_text(answer, item["answers"])
    elif kind == "json":
        ok = score_json(answer, item["keys"], item.get("values"))
    else:
        ok = score_code(answer, item["stdout"])
    return {"score": 100.0 if ok else 0.0, "passed": ok}
