"""Dataset specs (``name#N``), seeded sampling, and loading every source at once."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from tunesmith.data.sources import load_datasets, sample, split_spec
from tunesmith.utils import UserError

GOOD = {"instruction": "Hi", "output": "Hello"}
BAD = {"instruction": "Hi"}  # no output


# --- specs, sampling, loading ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("a#500", ("a", 500)),
        ("a", ("a", None)),
        ("AI-ModelScope/alpaca-gpt4-data-zh#500", ("AI-ModelScope/alpaca-gpt4-data-zh", 500)),
        ("data/train.jsonl#3", ("data/train.jsonl", 3)),
        ("a#b", ("a#b", None)),
        ("a#1#2", ("a#1", 2)),
    ],
)
def test_split_spec(spec: str, expected) -> None:
    assert split_spec(spec) == expected


def test_sample_is_deterministic_and_distinct_below_the_size() -> None:
    records = list(range(20))
    a = sample(records, 7, seed=1)
    assert a == sample(records, 7, seed=1)
    assert len(a) == 7 and len(set(a)) == 7 and set(a) <= set(records)
    assert any(sample(records, 7, seed=s) != a for s in range(2, 6))
    assert sample(records, None, seed=1) is records
    assert sample([], 5, seed=1) == []


def test_sample_larger_than_the_data_repeats_it() -> None:
    records = list(range(10))
    out = sample(records, 25, seed=3)
    assert len(out) == 25
    counts = Counter(out)
    assert set(counts) == set(records)
    assert sorted(counts.values()) == [2] * 5 + [3] * 5
    assert out == sample(records, 25, seed=3)


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n", "utf-8")
    return path


LOAD = {"model_name": None, "model_author": None, "use_hf": True, "seed": 42}


def test_load_datasets_concatenates_and_samples(tmp_path: Path) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", [GOOD] * 4)
    b = write_jsonl(tmp_path / "b.jsonl", [{"query": f"q{i}", "response": "r"} for i in range(6)])
    convs = load_datasets([str(a), f"{b}#3"], **LOAD)
    assert len(convs) == 7
    assert [c.origin for c in convs[:4]] == [f"{a}:{n}" for n in range(1, 5)]
    assert all(c.origin.startswith(f"{b}:") for c in convs[4:])


def test_load_datasets_reads_a_folder(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    (folder / "sub").mkdir(parents=True)
    write_jsonl(folder / "a.jsonl", [GOOD])
    write_jsonl(folder / "sub" / "b.jsonl", [GOOD, GOOD])
    (folder / "notes.txt").write_text("ignored", encoding="utf-8")
    assert len(load_datasets([str(folder)], **LOAD)) == 3


def test_load_datasets_lists_every_bad_record_of_every_file(tmp_path: Path) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", [BAD, {"instruction": ["x"], "output": "y"}, GOOD])
    b = write_jsonl(tmp_path / "b.jsonl", [GOOD, {"messages": [{"role": "bot", "content": "x"}]}])
    with pytest.raises(UserError) as e:
        load_datasets([str(a), str(b)], **LOAD)
    msg = str(e.value)
    assert "3 bad record(s)" in msg
    assert f"{a}:1: output:" in msg
    assert f"{a}:2: instruction:" in msg
    assert f"{b}:2: messages[0].role:" in msg
    assert f"{a}:3" not in msg and f"{b}:1" not in msg


def test_load_datasets_with_many_bad_records_shows_a_count(tmp_path: Path) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", [BAD] * 25)
    with pytest.raises(UserError) as e:
        load_datasets([str(a)], **LOAD)
    msg = str(e.value)
    assert "25 bad record(s)" in msg and "5 more" in msg
    assert f"{a}:20: output:" in msg and f"{a}:21: output:" not in msg


@pytest.mark.parametrize(
    ("specs", "needle"),
    [
        ([], "no training data"),
        (["missing.jsonl"], "no such file"),
        (["./missing"], "no such file"),
    ],
)
def test_load_datasets_user_errors(tmp_path: Path, specs, needle: str, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=needle):
        load_datasets(specs, **LOAD)


def test_load_datasets_unsupported_file_type(tmp_path: Path) -> None:
    p = tmp_path / "data.txt"
    p.write_text("a,b\n", encoding="utf-8")
    with pytest.raises(UserError, match="unsupported file type"):
        load_datasets([str(p)], **LOAD)


def test_self_cognition_needs_a_name() -> None:
    with pytest.raises(UserError, match="--model_name"):
        load_datasets(["self-cognition"], **LOAD)
    with pytest.raises(UserError, match="--model_name"):
        load_datasets(["swift/self-cognition#10"], **(LOAD | {"model_author": ["swift"]}))


def test_self_cognition_fills_in_name_and_author() -> None:
    kw = LOAD | {"model_name": ["小智", "XiaoZhi"], "model_author": ["星河", "Xinghe"]}
    convs = load_datasets(["self-cognition"], **kw)
    assert len(convs) > 100
    text = "\n".join(m.content for c in convs for m in c.messages)
    assert "{{NAME}}" not in text and "{{AUTHOR}}" not in text
    zh = [c for c in convs if c.tags["lang"] == "zh"]
    en = [c for c in convs if c.tags["lang"] == "en"]
    assert zh and en
    assert any("小智" in c.messages[-1].content for c in zh)
    assert not any("XiaoZhi" in c.messages[-1].content for c in zh)
    assert any("XiaoZhi" in c.messages[-1].content for c in en)
    sampled = load_datasets(["swift/self-cognition#30"], **kw)
    assert len(sampled) == 30
