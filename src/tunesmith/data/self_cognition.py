"""Builtin bilingual self-cognition dataset (teach a chat model its name and author).

The templates live in ``tunesmith/data/builtin/self_cognition.jsonl`` (one
``{"query", "response", "lang"}`` object per line, ``lang`` is ``"zh"`` or ``"en"``)
and contain the placeholders ``{{NAME}}`` and ``{{AUTHOR}}``. Held-out evaluation
questions, none of which appear in the training file, live in
``identity_probes.jsonl`` (``{"query", "lang"}`` per line).

Names follow ms-swift's ``--model_name`` / ``--model_author`` convention: a pair
``(zh, en)``; Chinese records get the first value and English records the second.
"""

from __future__ import annotations

import json
from importlib import resources

__all__ = [
    "AUTHOR_PLACEHOLDER",
    "LANGS",
    "NAME_PLACEHOLDER",
    "identity_probes",
    "parse_name_pair",
    "self_cognition_records",
]

NAME_PLACEHOLDER = "{{NAME}}"
AUTHOR_PLACEHOLDER = "{{AUTHOR}}"
LANGS: tuple[str, ...] = ("zh", "en")

_PACKAGE = "tunesmith.data.builtin"
_TRAIN_FILE = "self_cognition.jsonl"
_PROBE_FILE = "identity_probes.jsonl"


def parse_name_pair(
    value: str | list[str] | tuple[str, ...] | None,
    default: tuple[str, str],
) -> tuple[str, str]:
    """Turn a ``--model_name`` / ``--model_author`` value into a ``(zh, en)`` pair.

    - ``None`` or an empty list/tuple gives ``default``.
    - A string is one name (never split on spaces: ``"Xiao Huang"`` is one name),
      used for both languages.
    - A list/tuple of one string is used for both languages; of two strings it is
      ``(zh, en)``, e.g. ``["小黄", "Xiao Huang"]``.

    Raises:
        ValueError: more than two values, or an empty/blank name.
        TypeError: a value that is not a string.
    """
    if value is None:
        return default
    if isinstance(value, str):
        values: list[str] = [value]
    elif isinstance(value, (list, tuple)):
        values = list(value)
    else:
        raise TypeError(
            f"expected a string or a list of 1 or 2 strings, got {type(value).__name__}"
        )
    if not values:
        return default
    if len(values) > 2:
        raise ValueError(
            f"expected 1 or 2 values (Chinese name, English name), got {len(values)}: {values!r}"
        )
    names: list[str] = []
    for item in values:
        if not isinstance(item, str):
            raise TypeError(f"names must be strings, got {type(item).__name__}: {item!r}")
        stripped = item.strip()
        if not stripped:
            raise ValueError(f"names must not be empty, got {values!r}")
        names.append(stripped)
    if len(names) == 1:
        return names[0], names[0]
    return names[0], names[1]


def _check_lang(lang: str | None) -> None:
    if lang is not None and lang not in LANGS:
        raise ValueError(f"lang must be one of {LANGS} or None, got {lang!r}")


def _read_jsonl(filename: str) -> list[dict[str, str]]:
    text = resources.files(_PACKAGE).joinpath(filename).read_text(encoding="utf-8")
    records: list[dict[str, str]] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{filename}:{lineno}: invalid JSON: {exc}") from exc
    return records


def _fill(text: str, name: str, author: str) -> str:
    return text.replace(NAME_PLACEHOLDER, name).replace(AUTHOR_PLACEHOLDER, author)


def self_cognition_records(
    name: tuple[str, str],
    author: tuple[str, str],
    lang: str | None = None,
) -> list[dict[str, str]]:
    """Return the builtin self-cognition records with name and author filled in.

    Args:
        name: ``(zh, en)`` model name, e.g. from :func:`parse_name_pair`.
        author: ``(zh, en)`` model author.
        lang: ``"zh"`` or ``"en"`` to keep one language; ``None`` keeps both.

    Returns:
        ``[{"query", "response", "lang"}, ...]`` in file order. ``{{NAME}}`` and
        ``{{AUTHOR}}`` are replaced (in query and response) by the Chinese value in
        ``zh`` records and the English value in ``en`` records.
    """
    _check_lang(lang)
    by_lang = {"zh": (name[0], author[0]), "en": (name[1], author[1])}
    out: list[dict[str, str]] = []
    for rec in _read_jsonl(_TRAIN_FILE):
        rec_lang = rec["lang"]
        if lang is not None and rec_lang != lang:
            continue
        n, a = by_lang[rec_lang]
        out.append(
            {
                "query": _fill(rec["query"], n, a),
                "response": _fill(rec["response"], n, a),
                "lang": rec_lang,
            }
        )
    return out


def identity_probes(lang: str | None = None) -> list[dict[str, str]]:
    """Return held-out identity questions ``[{"query", "lang"}, ...]`` in file order.

    None of these questions appear in the training file, even after normalising
    case, whitespace and punctuation. ``lang`` (``"zh"``/``"en"``) filters.
    """
    _check_lang(lang)
    return [
        {"query": rec["query"], "lang": rec["lang"]}
        for rec in _read_jsonl(_PROBE_FILE)
        if lang is None or rec["lang"] == lang
    ]
