"""Malformed datasets through the real CLI: ``tunesmith data`` must answer every one of them with
exit status 2 and one ``error:`` message naming ``file:line: field`` — never a traceback.

The committed corpus is ``tests/data/bad/`` (expectations in its ``EXPECTED.json``). Binary and
huge inputs (Latin-1 bytes, BOM/CRLF variants, a 10 MB line) are written into ``tmp_path`` here.
Cases marked ``xfail(strict=True)`` are known bugs in ``src/``: fixing one makes its test XPASS,
which fails the run until the mark is removed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tunesmith.cli import main

CORPUS = Path(__file__).resolve().parents[1] / "data" / "bad"
EXPECTED: dict[str, dict] = json.loads((CORPUS / "EXPECTED.json").read_text("utf-8"))["files"]

GOOD = {"instruction": "Say hi.", "output": "Hi!"}
GOOD_LINE = json.dumps(GOOD)


def run_data(capsys, model_dir: Path, *datasets: Path, extra: tuple[str, ...] = ()):
    """``tunesmith data --dataset …  --model TINY``: (return code, stdout, stderr)."""
    argv = ["data", "--dataset", *map(str, datasets), "--model", str(model_dir), *extra]
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def the_error(err: str) -> str:
    """The one ``error:`` message of stderr (with its indented continuation lines)."""
    assert "Traceback" not in err, err
    starts = [i for i, line in enumerate(err.splitlines()) if line.startswith("error:")]
    assert len(starts) == 1, f"expected one 'error:' message in stderr, got:\n{err}"
    lines = err.splitlines()[starts[0] :]
    body = [lines[0]]
    for line in lines[1:]:
        if not line.startswith("  "):
            break
        body.append(line)
    return "\n".join(body)


def assert_reported(rc: int, err: str, path: Path, expected: dict) -> None:
    assert rc == 2, err
    msg = the_error(err)
    line = expected.get("line")
    where = f"{path}:{line}: " if line is not None else f"{path}: "
    if line is None and expected.get("message", "").startswith("no training records"):
        where = str(path)  # the whole --dataset value is named, not one file of it
    assert where in msg, f"{where!r} not in:\n{msg}"
    if expected.get("field"):
        assert f"{where}{expected['field']}: " in msg, msg
    if expected.get("message"):
        assert expected["message"] in msg, msg
    assert " at at " not in msg, msg  # json's e.msg may end in "at" already


def xfail_marks(expected: dict, raises: type[BaseException]) -> list:
    """``xfail(strict=True)`` for a known src bug, failing only the way it fails today."""
    if "xfail" not in expected:
        return []
    return [pytest.mark.xfail(reason=expected["xfail"], strict=True, raises=raises)]


def corpus_cases():
    for name, exp in sorted(EXPECTED.items()):
        yield pytest.param(name, exp, id=name, marks=xfail_marks(exp, AssertionError))


# --- the committed corpus ------------------------------------------------------------------


def test_corpus_matches_expected_and_stays_small() -> None:
    files = {p.name for p in CORPUS.iterdir() if p.name != "EXPECTED.json"}
    assert files == set(EXPECTED), "every corpus file needs an EXPECTED.json entry and back"
    assert len(files) >= 24
    assert sum(p.stat().st_size for p in CORPUS.iterdir()) < 50_000


@pytest.mark.parametrize(("name", "expected"), list(corpus_cases()))
def test_bad_file_is_reported_precisely(capsys, tiny_model_dir, name: str, expected: dict):
    path = CORPUS / name
    rc, _, err = run_data(capsys, tiny_model_dir, path)
    assert_reported(rc, err, path, expected)


# --- generated bad inputs (binary, or too big to commit) ------------------------------------


def _lines(*lines: str | bytes) -> bytes:
    return b"\n".join(x if isinstance(x, bytes) else x.encode("utf-8") for x in lines) + b"\n"


GENERATED_BAD: dict[str, tuple[Callable[[], bytes], dict]] = {
    "latin1.jsonl": (
        lambda: _lines(
            GOOD_LINE, '{"instruction": "Café?", "output": "Oui, café."}'.encode("latin-1")
        ),
        {"line": 2, "message": "not valid UTF-8 (byte 0xe9)"},
    ),
    "latin1.csv": (
        lambda: "instruction,output\nSay hi.,Hi!\nSay bye.,Bye!\nCafé?,Oui.\n".encode("latin-1"),
        {"line": 4, "message": "not valid UTF-8"},
    ),
    "non_utf8_line3.jsonl": (
        lambda: _lines(
            GOOD_LINE, GOOD_LINE, b'{"instruction": "\xff\xfe?", "output": "x"}', GOOD_LINE
        ),
        {"line": 3, "message": "not valid UTF-8 (byte 0xff)"},
    ),
    "huge_integer.jsonl": (
        lambda: _lines(GOOD_LINE, '{"instruction": "Big?", "output": ' + "9" * 5000 + "}"),
        {"line": 2, "field": "record", "message": "invalid JSON (Exceeds the limit (4300 digits)"},
    ),
    "deep_nesting.jsonl": (
        lambda: _lines(GOOD_LINE, '{"instruction": ' + "[" * 100_000 + "}"),
        {"line": 2, "field": "record", "message": "invalid JSON (nested too deeply)"},
    ),
    "deep_nesting.json": (
        lambda: ("[\n" + GOOD_LINE + ",\n" + "[" * 100_000 + "\n]\n").encode(),
        {"line": 3, "message": "invalid JSON (nested too deeply)"},
    ),
    "lone_surrogate.jsonl": (
        lambda: _lines(GOOD_LINE, '{"instruction": "Hi \\ud800 there", "output": "x"}'),
        {"line": 2, "field": "instruction", "message": "lone surrogate"},
    ),
    "lone_surrogate_in_turn.jsonl": (
        lambda: _lines(
            '{"conversations": [{"from": "human", "value": "x\\udfff"}, '
            '{"from": "gpt", "value": "y"}]}'
        ),
        {"line": 1, "field": "conversations[0].value", "message": "lone surrogate"},
    ),
    "lone_surrogate_in_history.jsonl": (
        lambda: _lines('{"instruction": "a", "output": "b", "history": [["hi \\ud800", "there"]]}'),
        {
            "line": 1,
            "field": "history[0]",
            "message": "lone surrogate",
        },
    ),
}


@pytest.mark.parametrize(
    ("name", "make", "expected"),
    [
        pytest.param(
            name,
            make,
            exp,
            id=name,
            marks=xfail_marks(exp, exp.get("raises", AssertionError)),
        )
        for name, (make, exp) in GENERATED_BAD.items()
    ],
)
def test_generated_bad_file_is_reported_precisely(
    capsys, tiny_model_dir, tmp_path: Path, name: str, make, expected: dict
):
    path = tmp_path / name
    path.write_bytes(make())
    rc, _, err = run_data(capsys, tiny_model_dir, path)
    assert_reported(rc, err, path, expected)


# --- all problems at once --------------------------------------------------------------------


def test_25_bad_records_show_the_first_20_and_a_count(capsys, tiny_model_dir):
    path = CORPUS / "many_bad_25.jsonl"
    lines = path.read_text("utf-8").splitlines()
    bad = [n for n, line in enumerate(lines, 1) if "Good" not in line]
    assert len(bad) == 25
    rc, _, err = run_data(capsys, tiny_model_dir, path)
    assert rc == 2
    msg = the_error(err)
    assert "25 bad record(s)" in msg
    listed = [line for line in msg.splitlines()[1:] if line.startswith(f"  {path}:")]
    assert [int(x.split(f"{path}:")[1].split(":")[0]) for x in listed] == bad[:20]
    assert msg.rstrip().endswith("… and 5 more")
    for n in bad[20:]:
        assert f"{path}:{n}:" not in msg
    assert f"{path}:3: instruction: " in msg
    assert f"{path}:4: messages[0].role: " in msg
    assert f"{path}:5: turn 1: " in msg  # a ShareGPT record without the assistant's reply


def test_strict_false_skips_and_counts_bad_records(capsys, tiny_model_dir):
    path = CORPUS / "mixed_3_bad_5_good.jsonl"
    rc, out, err = run_data(capsys, tiny_model_dir, path, extra=("--strict", "false"))
    assert rc == 0, err
    assert "Traceback" not in err
    assert "error:" not in err
    assert "skipped 3 bad record(s)" in out
    for where in (f"{path}:2: output: ", f"{path}:5: turn 1: ", f"{path}:8: record: "):
        assert where in out
    assert f"{path}: 5 records" in out


def test_bad_records_of_two_files_are_listed_in_one_error(capsys, tiny_model_dir):
    a = CORPUS / "missing_output.jsonl"
    b = CORPUS / "messages_unknown_role.jsonl"
    rc, _, err = run_data(capsys, tiny_model_dir, a, b)
    assert rc == 2
    msg = the_error(err)
    assert "2 bad record(s)" in msg
    assert f"{a}:2: output: " in msg
    assert f"{b}:2: messages[1].role: " in msg


def test_bad_records_of_train_and_val_are_listed_in_one_error(capsys, tiny_model_dir):
    a = CORPUS / "missing_output.jsonl"
    b = CORPUS / "messages_unknown_role.jsonl"
    rc, _, err = run_data(capsys, tiny_model_dir, a, extra=("--val_dataset", str(b)))
    assert rc == 2
    msg = the_error(err)
    assert f"{a}:2: output: " in msg
    assert f"{b}:2: messages[1].role: " in msg


def test_a_broken_jsonl_line_is_one_problem_among_all(capsys, tiny_model_dir):
    a = CORPUS / "jsonl_not_json.jsonl"
    b = CORPUS / "missing_output.jsonl"
    rc, _, err = run_data(capsys, tiny_model_dir, a, b)
    assert rc == 2
    msg = the_error(err)
    assert "2 bad record(s)" in msg
    assert f"{a}:3: record: invalid JSON" in msg and f"{b}:2: output: " in msg
    rc, out, err = run_data(capsys, tiny_model_dir, a, extra=("--strict", "false"))
    assert rc == 0, err
    assert "skipped 1 bad record(s)" in out
    assert f"{a}: 3 records" in out


def test_a_csv_row_with_extra_values_is_one_problem_among_all(capsys, tiny_model_dir):
    a = CORPUS / "csv_extra_values.csv"
    b = CORPUS / "missing_output.jsonl"
    rc, _, err = run_data(capsys, tiny_model_dir, a, b)
    assert rc == 2
    msg = the_error(err)
    assert "2 bad record(s)" in msg
    assert f"{a}:3: record: 1 more value(s)" in msg and f"{b}:2: output: " in msg
    rc, out, err = run_data(capsys, tiny_model_dir, a, extra=("--strict", "false"))
    assert rc == 0, err
    assert "skipped 1 bad record(s)" in out


# --- good but odd: must load --------------------------------------------------------------------

BOM = b"\xef\xbb\xbf"
TWO = [GOOD, {"instruction": "你好", "output": "世界"}]


def _json_crlf() -> bytes:
    return json.dumps(TWO, ensure_ascii=False, indent=2).replace("\n", "\r\n").encode("utf-8")


GOOD_ODD: dict[str, tuple[Callable[[], bytes], int]] = {
    "bom.jsonl": (lambda: BOM + _lines(*(json.dumps(r, ensure_ascii=False) for r in TWO)), 2),
    "bom.json": (lambda: BOM + json.dumps(TWO, ensure_ascii=False).encode("utf-8"), 2),
    "bom.csv": (lambda: BOM + "instruction,output\nSay hi.,Hi!\n你好,世界\n".encode(), 2),
    "bom_object.json": (lambda: BOM + json.dumps(GOOD).encode(), 1),
    "crlf.jsonl": (
        lambda: "\r\n".join(json.dumps(r, ensure_ascii=False) for r in TWO).encode() + b"\r\n",
        2,
    ),
    "crlf.json": (_json_crlf, 2),
    "bom_crlf.json": (lambda: BOM + _json_crlf(), 2),
    "crlf.csv": (
        lambda: b'instruction,output\r\nSay hi.,Hi!\r\n"Two\r\nlines",Fine.\r\nA,B\r\n',
        3,
    ),
    "blank_lines_and_separators.jsonl": (
        lambda: _lines(
            "",
            json.dumps({"instruction": "line\u2028separator", "output": "ok"}, ensure_ascii=False),
            "   ",
            json.dumps({"instruction": "next\x85line", "output": "ok"}, ensure_ascii=False),
            "",
        ),
        2,
    ),
    "UPPER.JSONL": (lambda: _lines(GOOD_LINE), 1),
}


@pytest.mark.parametrize(("name", "make", "records"), [(n, *v) for n, v in GOOD_ODD.items()])
def test_good_but_odd_file_loads(
    capsys, tiny_model_dir, tmp_path: Path, name: str, make, records: int
):
    path = tmp_path / name
    path.write_bytes(make())
    rc, out, err = run_data(capsys, tiny_model_dir, path)
    assert rc == 0, err
    assert "Traceback" not in err and "error:" not in err
    assert f"{path}: {records} records" in out


def test_csv_with_a_300_kb_cell_loads(capsys, tiny_model_dir, tmp_path: Path):
    path = tmp_path / "big_cell.csv"
    path.write_text("instruction,output\nSummarize.," + "word " * 60_000 + "\nA,B\n", "utf-8")
    rc, out, err = run_data(capsys, tiny_model_dir, path, extra=("--max_length", "1000000"))
    assert rc == 0, err
    assert f"{path}: 2 records" in out


def _ten_mb_line(path: Path, text: str) -> None:
    big = json.dumps({"instruction": "Summarize.", "output": text})
    assert len(big) >= 10_000_000
    path.write_text(big + "\n" + GOOD_LINE + "\n", "utf-8")


def test_a_10_mb_single_line_record_loads(capsys, tiny_model_dir, tmp_path: Path):
    """The reader copes; the record is longer than --max_length and is deleted, not fatal."""
    path = tmp_path / "ten_mb_line.jsonl"
    _ten_mb_line(path, "The quick brown fox jumps over the lazy dog. " * 222_223)
    rc, out, err = run_data(capsys, tiny_model_dir, path)
    assert rc == 0, err
    assert "Traceback" not in err and "error:" not in err
    assert f"{path}: 1 records" in out
    assert "1 deleted" in out


@pytest.mark.parametrize("truncation", ["delete", "right"])
def test_a_10_mb_whitespace_run_loads_or_fails_clearly(
    capsys, tiny_model_dir, tmp_path: Path, truncation: str
):
    path = tmp_path / "ten_mb_spaces.jsonl"
    _ten_mb_line(path, "Hi" + " " * 10_000_000 + "there")
    extra = ("--truncation_strategy", truncation)
    rc, out, err = run_data(capsys, tiny_model_dir, path, extra=extra)
    assert "Traceback" not in err
    if rc == 0:
        kept, dropped = ("1", "1 deleted") if truncation == "delete" else ("2", "1 truncated")
        assert f"{path}: {kept} records" in out and dropped in out
    else:
        assert rc == 2
        assert f"{path}:1: " in the_error(err)
