"""Record formats and file reading with exact line numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunesmith.data.formats import RecordError, RecordProblem, detect_format, to_conversation
from tunesmith.data.messages import Message
from tunesmith.data.sources import read_local
from tunesmith.utils import UserError

EXPECTED = [
    Message("system", "Be brief."),
    Message("user", "Hi"),
    Message("assistant", "Hello!"),
    Message("user", "What is 1+1?"),
    Message("assistant", "2"),
]

SAME_CONVERSATION = {
    "alpaca": {
        "system": "Be brief.",
        "history": [["Hi", "Hello!"]],
        "instruction": "What is 1+1?",
        "input": "",
        "output": "2",
    },
    "query_response": {
        "system": "Be brief.",
        "history": [["Hi", "Hello!"]],
        "query": "What is 1+1?",
        "response": "2",
    },
    "messages": {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "What is 1+1?"},
            {"role": "assistant", "content": "2"},
        ]
    },
    "sharegpt": {
        "system": "Be brief.",
        "conversations": [
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello!"},
            {"from": "human", "value": "What is 1+1?"},
            {"from": "gpt", "value": "2"},
        ],
    },
}


@pytest.mark.parametrize("fmt", list(SAME_CONVERSATION))
def test_every_format_gives_the_same_conversation(fmt: str) -> None:
    record = SAME_CONVERSATION[fmt]
    assert detect_format(record) == fmt
    conv = to_conversation(record, f"x.jsonl:{fmt}")
    assert conv.messages == EXPECTED
    assert conv.origin == f"x.jsonl:{fmt}"
    assert conv.system == "Be brief."


def test_alpaca_input_is_appended_to_the_instruction() -> None:
    conv = to_conversation({"instruction": "Translate:", "input": "你好", "output": "Hello"}, "w")
    assert conv.messages == [Message("user", "Translate:\n你好"), Message("assistant", "Hello")]
    assert conv.system is None


def problem(record, where: str = "f.jsonl:3") -> RecordProblem:
    """The RecordProblem a loader would report for ``record``."""
    with pytest.raises(RecordError) as e:
        to_conversation(record, where)
    p = RecordProblem(where, e.value.field, e.value.message)
    assert str(p).startswith(f"{where}: {p.field}: ")
    return p


@pytest.mark.parametrize(
    ("record", "field", "words"),
    [
        ({"instruction": "Hi"}, "output", "missing"),
        ({"instruction": "Hi", "output": None}, "output", "missing"),
        ({"instruction": "Hi", "output": ""}, "output", "empty"),
        ({"instruction": "Hi", "output": "   "}, "output", "empty"),
        ({"instruction": ["Hi", "there"], "output": "Hello"}, "instruction", "a list"),
        ({"instruction": "Hi", "output": ["Hello"]}, "output", "a list"),
        ({"instruction": "Hi", "output": 3}, "output", "a number"),
        ({"instruction": "Hi", "output": {"text": "x"}}, "output", "an object"),
        ({"query": "Hi", "response": ["a"]}, "response", "a list"),
        ({"query": "Hi", "response": "a", "history": "nope"}, "history", "list"),
        ({"query": "Hi", "response": "a", "history": [["q"]]}, "history[0]", "pair"),
        (
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "x"}]},
            "messages[1].role",
            "unknown role 'bot'",
        ),
        (
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant"}]},
            "messages[1].content",
            "expected a string",
        ),
        ({"messages": []}, "messages", "non-empty list"),
        ({"messages": ["Hi"]}, "messages[0]", "an object"),
        (
            {"conversations": [{"from": "human", "value": "Hi"}, {"from": "robot", "value": "x"}]},
            "conversations[1].from",
            "unknown role",
        ),
        (
            {
                "messages": [
                    {"role": "assistant", "content": "Hello"},
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hi"},
                ]
            },
            "turn 1",
            "user",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "Hi"},
                    {"role": "user", "content": "Hi again"},
                    {"role": "assistant", "content": "Hello"},
                ]
            },
            "turns",
            "two 'user' turns in a row",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": ""},
                ]
            },
            "turn 2",
            "empty assistant reply",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello"},
                    {"role": "user", "content": "Bye"},
                ]
            },
            "turn 3",
            "last turn",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "Hi"},
                    {"role": "system", "content": "late"},
                    {"role": "assistant", "content": "Hello"},
                ]
            },
            "turn 2",
            "system",
        ),
        ({"text": "free text"}, "record", "unrecognised format"),
        (["not", "an", "object"], "record", "JSON object"),
    ],
)
def test_bad_records_name_the_field(record, field: str, words: str) -> None:
    p = problem(record)
    assert p.field == field
    assert words in p.message


# --- local files ----------------------------------------------------------------------------

GOOD = {"instruction": "Hi", "output": "Hello"}
BAD = {"instruction": "Hi"}  # no output


def read(path: Path) -> tuple[list, list[RecordProblem]]:
    problems: list[RecordProblem] = []
    return read_local(path, problems), problems


def test_jsonl_reports_the_line_of_the_bad_record(tmp_path: Path) -> None:
    p = tmp_path / "d.jsonl"
    lines = [json.dumps(GOOD), "", json.dumps(GOOD), json.dumps(BAD), json.dumps(GOOD)]
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    convs, problems = read(p)
    assert [c.origin for c in convs] == [f"{p}:1", f"{p}:3", f"{p}:5"]
    assert [(x.where, x.field) for x in problems] == [(f"{p}:4", "output")]


def test_pretty_printed_json_array_reports_the_line_where_the_record_starts(
    tmp_path: Path,
) -> None:
    p = tmp_path / "d.json"
    text = json.dumps([GOOD, GOOD, BAD, GOOD], indent=2)
    p.write_text(text, encoding="utf-8")
    lines = text.splitlines()
    starts = [i + 1 for i, line in enumerate(lines) if line == "  {"]
    assert len(starts) == 4 and starts[2] > 3
    convs, problems = read(p)
    assert [c.origin for c in convs] == [f"{p}:{n}" for n in (starts[0], starts[1], starts[3])]
    assert [(x.where, x.field) for x in problems] == [(f"{p}:{starts[2]}", "output")]


def test_json_array_on_one_line_and_single_object(tmp_path: Path) -> None:
    p = tmp_path / "one.json"
    p.write_text(json.dumps([GOOD, GOOD]), encoding="utf-8")
    convs, problems = read(p)
    assert len(convs) == 2 and not problems
    q = tmp_path / "obj.json"
    q.write_text("\n\n" + json.dumps(GOOD), encoding="utf-8")
    convs, _ = read(q)
    assert [c.origin for c in convs] == [f"{q}:3"]
    e = tmp_path / "empty.json"
    e.write_text("[ ]", encoding="utf-8")
    assert read(e) == ([], [])


def test_jsonl_saved_as_json(tmp_path: Path) -> None:
    p = tmp_path / "d.json"
    p.write_text(f"{json.dumps(GOOD)}\n{json.dumps(BAD)}\n", encoding="utf-8")
    convs, problems = read(p)
    assert len(convs) == 1
    assert [(x.where, x.field) for x in problems] == [(f"{p}:2", "output")]


@pytest.mark.parametrize(
    ("name", "text", "line"),
    [
        ("d.json", '[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "a" "x"}\n]', 3),
        ("d.json", '[\n  {"instruction": "a", "output": "b"}\n  {"instruction": "a"}\n]', 3),
        ("d.json", '{\n  "instruction": "a",\n  "output": \n}', 4),
    ],
)
def test_invalid_json_names_file_and_line(tmp_path: Path, name: str, text: str, line: int) -> None:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    with pytest.raises(UserError, match="invalid JSON") as e:
        read(p)
    assert str(e.value).startswith(f"{p}:{line}:")


def test_invalid_jsonl_line_is_one_bad_record(tmp_path: Path) -> None:
    p = tmp_path / "d.jsonl"
    p.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "a",\n', "utf-8")
    records, problems = read(p)
    assert len(records) == 1
    assert [(x.where, x.field) for x in problems] == [(f"{p}:3", "record")]
    assert "invalid JSON" in problems[0].message


def test_bom_and_crlf_load_fine(tmp_path: Path) -> None:
    records = [GOOD, {"instruction": "你好", "output": "世界"}, BAD]
    jsonl = tmp_path / "crlf.jsonl"
    body = "\r\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\r\n"
    jsonl.write_bytes(b"\xef\xbb\xbf" + body.encode("utf-8"))
    convs, problems = read(jsonl)
    assert [c.messages[-1].content for c in convs] == ["Hello", "世界"]
    assert [x.where for x in problems] == [f"{jsonl}:3"]

    arr = tmp_path / "crlf.json"
    text = json.dumps(records, ensure_ascii=False, indent=2).replace("\n", "\r\n")
    arr.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    convs, problems = read(arr)
    assert [c.messages[0].content for c in convs] == ["Hi", "你好"]
    starts = [i + 1 for i, line in enumerate(text.split("\r\n")) if line == "  {"]
    assert [x.where for x in problems] == [f"{arr}:{starts[2]}"]


def test_latin1_file_is_a_user_error_naming_the_line(tmp_path: Path) -> None:
    p = tmp_path / "latin1.jsonl"
    lines = [json.dumps(GOOD), json.dumps(GOOD), '{"instruction": "café", "output": "x"}']
    p.write_bytes("\n".join(lines).encode("latin-1"))
    with pytest.raises(UserError) as e:
        read(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}:3:")
    assert "UTF-8" in msg and "0xe9" in msg


def test_empty_file_is_a_user_error(tmp_path: Path) -> None:
    p = tmp_path / "empty.jsonl"
    p.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(UserError, match="empty"):
        read(p)


def test_jsonl_with_unicode_line_separators_inside_strings(tmp_path: Path) -> None:
    p = tmp_path / "seps.jsonl"
    records = [
        {"instruction": "line\u2028separator", "output": "ok"},
        {"instruction": "next\x85line", "output": "ok"},
        BAD,
    ]
    p.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records), encoding="utf-8")
    convs, problems = read(p)
    assert [c.messages[0].content for c in convs] == ["line\u2028separator", "next\x85line"]
    assert [x.where for x in problems] == [f"{p}:3"]
