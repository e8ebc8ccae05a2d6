"""Record formats -> ``Conversation``, with problems reported as ``file:line: field: …``.

Supported, detected per record: alpaca (``instruction``/``input``/``output``, optional
``system`` and ``history``), ``query``/``response``/``history``, OpenAI ``messages``
(``role``/``content``) and ShareGPT ``conversations`` (``from``/``value``).

For inference (``prompt_only``) the final reply is optional: a record may end with the user's
turn, or leave ``output``/``response`` out; when present, the reply is the reference answer.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from tunesmith.data.messages import ROLES, Conversation, Message

SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant"}
SHAREGPT_ROLES |= {"assistant": "assistant", "tool": "tool", "function": "tool"}
SHAREGPT_ROLES |= {"observation": "tool"}


@dataclass
class RecordProblem:
    """One thing wrong with one record, located precisely enough to fix it."""

    where: str
    """``file:line`` of the record."""
    field: str
    """The field at fault (``output``, ``messages[2].role``, …) or ``record``."""
    message: str
    """What is wrong and what was expected."""

    def __str__(self) -> str:
        return f"{self.where}: {self.field}: {self.message}"


class RecordError(ValueError):
    """Raised by a converter for a record it cannot use."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def _text(record: dict[str, Any], key: str, *, required: bool, allow_empty: bool = False) -> str:
    if key not in record or record[key] is None:
        if required:
            raise RecordError(key, "missing (expected a non-empty string)")
        return ""
    value = record[key]
    if not isinstance(value, str):
        raise RecordError(key, f"expected a string, got {_kind(value)}")
    if required and not allow_empty and not value.strip():
        raise RecordError(key, "empty (expected a non-empty string)")
    return _valid_unicode(key, value)


def _valid_unicode(field: str, value: str) -> str:
    """Reject lone surrogates (``"\\ud800"`` escapes): JSON allows them, UTF-8 cannot hold them."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RecordError(
            field, f"invalid Unicode at character {e.start} (a lone surrogate escape)"
        ) from None
    return value


def _kind(value: Any) -> str:
    kinds = {dict: "an object", list: "a list", bool: "a boolean", int: "a number"}
    kinds |= {float: "a number", str: "a string", type(None): "null"}
    if isinstance(value, list | dict | str) and not value:
        return f"an empty {kinds[type(value)].split()[-1]}"
    return kinds.get(type(value), type(value).__name__)


def _history(record: dict[str, Any]) -> list[Message]:
    history = record.get("history") or []
    if not isinstance(history, list):
        raise RecordError(
            "history", f"expected a list of [query, response] pairs, got {_kind(history)}"
        )
    out = []
    for i, pair in enumerate(history):
        if not (isinstance(pair, list | tuple) and len(pair) == 2):
            raise RecordError(f"history[{i}]", "expected a [query, response] pair")
        if not all(isinstance(x, str) and x.strip() for x in pair):
            raise RecordError(f"history[{i}]", "expected two non-empty strings")
        for text in pair:
            _valid_unicode(f"history[{i}]", text)
        out += [Message("user", pair[0]), Message("assistant", pair[1])]
    return out


def _system(record: dict[str, Any]) -> list[Message]:
    system = _text(record, "system", required=False)
    return [Message("system", system)] if system.strip() else []


def _reply(record: dict[str, Any], key: str, prompt_only: bool) -> list[Message]:
    """The final assistant turn; for inference it may be missing (no reference answer)."""
    value = record.get(key)
    if prompt_only and (value is None or (isinstance(value, str) and not value.strip())):
        return []
    return [Message("assistant", _text(record, key, required=True))]


def from_alpaca(record: dict[str, Any], prompt_only: bool = False) -> list[Message]:
    """alpaca: ``instruction`` (+ ``input``) is the user turn, ``output`` the reply."""
    instruction = _text(record, "instruction", required=True)
    extra = _text(record, "input", required=False)
    query = f"{instruction}\n{extra}" if extra.strip() else instruction
    return [
        *_system(record),
        *_history(record),
        Message("user", query),
        *_reply(record, "output", prompt_only),
    ]


def from_query_response(record: dict[str, Any], prompt_only: bool = False) -> list[Message]:
    """``query``/``response`` (+ ``history``, ``system``), ms-swift's own format."""
    query = _text(record, "query", required=True)
    return [
        *_system(record),
        *_history(record),
        Message("user", query),
        *_reply(record, "response", prompt_only),
    ]


def _turns(
    record: dict[str, Any], key: str, role_key: str, text_key: str, roles: dict
) -> list[Message]:
    turns = record[key]
    if not isinstance(turns, list) or not turns:
        raise RecordError(key, f"expected a non-empty list of turns, got {_kind(turns)}")
    out = []
    for i, turn in enumerate(turns):
        where = f"{key}[{i}]"
        if not isinstance(turn, dict):
            raise RecordError(where, f"expected an object with '{role_key}' and '{text_key}'")
        role = turn.get(role_key)
        if role not in roles:
            raise RecordError(
                f"{where}.{role_key}", f"unknown role {role!r} (expected one of {', '.join(roles)})"
            )
        content = turn.get(text_key)
        if not isinstance(content, str):
            raise RecordError(f"{where}.{text_key}", f"expected a string, got {_kind(content)}")
        out.append(Message(roles[role], _valid_unicode(f"{where}.{text_key}", content)))
    return out


def from_messages(record: dict[str, Any], prompt_only: bool = False) -> list[Message]:
    """OpenAI chat format: ``messages`` = [{"role", "content"}, …]. A ``response`` after
    messages that end with the user's turn is the reply: that is the shape of a batch
    inference result line, so the base model's own answers can be trained on as they are."""
    turns = _turns(record, "messages", "role", "content", {r: r for r in ROLES})
    if turns[-1].role == "user" and record.get("response") is not None:
        turns += _reply(record, "response", prompt_only)
    return turns


def from_sharegpt(record: dict[str, Any], prompt_only: bool = False) -> list[Message]:
    """ShareGPT: ``conversations`` = [{"from": human|gpt|system, "value"}, …]."""
    return [*_system(record), *_turns(record, "conversations", "from", "value", SHAREGPT_ROLES)]


FORMATS = {
    "alpaca": from_alpaca,
    "query_response": from_query_response,
    "messages": from_messages,
    "sharegpt": from_sharegpt,
}


def detect_format(record: dict[str, Any]) -> str:
    """Name of the format a record is in, from the fields it has."""
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "query" in record or "response" in record:
        return "query_response"
    if "instruction" in record or "output" in record:
        return "alpaca"
    raise RecordError(
        "record",
        "unrecognised format: expected alpaca (instruction, input, output), query/response, "
        f"messages or conversations fields; found {', '.join(map(str, record)) or 'none'}",
    )


def check_order(messages: list[Message], prompt_only: bool = False) -> None:
    """Roles must alternate user/assistant after an optional system turn; the last is assistant
    (or, with ``prompt_only``, the user's question still to be answered)."""
    body = messages[1:] if messages and messages[0].role == "system" else messages
    for i, m in enumerate(body):
        if m.role == "system":
            raise RecordError(f"turn {i + 1}", "a system turn is only allowed first")
    roles = [m.role for m in body if m.role != "tool"]
    if not roles or roles[0] != "user":
        raise RecordError("turn 1", "the first turn after the system prompt must be the user's")
    if roles[-1] != "assistant" and not (prompt_only and roles[-1] == "user"):
        raise RecordError(f"turn {len(body)}", "the last turn must be the assistant's reply")
    for a, b in itertools.pairwise(roles):
        if a == b:
            raise RecordError(
                "turns", f"two '{a}' turns in a row (expected user and assistant to alternate)"
            )
    for i, m in enumerate(body):
        if m.role == "assistant" and not m.content.strip():
            raise RecordError(f"turn {i + 1}", "empty assistant reply")


def to_conversation(
    record: Any, where: str, fmt: str | None = None, prompt_only: bool = False
) -> Conversation:
    """Convert one raw record; raises ``RecordError`` naming the field at fault.

    ``prompt_only`` (inference): the final assistant reply may be missing.
    """
    if not isinstance(record, dict):
        raise RecordError("record", f"expected a JSON object, got {_kind(record)}")
    messages = FORMATS[fmt or detect_format(record)](record, prompt_only)
    check_order(messages, prompt_only)
    return Conversation(messages, origin=where)
