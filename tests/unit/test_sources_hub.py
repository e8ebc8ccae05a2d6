"""The seeds' mixed hub command with local stand-ins, offline failures, mixing and splitting."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from tunesmith.cli import main, parse_args
from tunesmith.config import SftArgs
from tunesmith.data.prepare import load_conversations
from tunesmith.data.sources import mix, split_val
from tunesmith.options import data_options, parse_columns, parse_probs
from tunesmith.utils import UserError

ZH = "AI-ModelScope/alpaca-gpt4-data-zh"
EN = "AI-ModelScope/alpaca-gpt4-data-en"


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")


@pytest.fixture
def mirror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Local stand-ins for the seeds' two hub datasets, named the same way."""
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "cache" / "datasets"
    _write_jsonl(
        root / f"{ZH}.jsonl",
        [{"instruction": f"问题{i}", "input": "", "output": f"回答{i}"} for i in range(60)],
    )
    en_dir = root / EN  # a folder works too
    _write_jsonl(
        en_dir / "train.jsonl",
        [{"instruction": f"question {i}", "input": "", "output": f"answer {i}"} for i in range(40)],
    )
    return root


SEED_FLAGS = ["--model_name", "小黄", "Xiao Huang", "--model_author", "魔搭", "ModelScope"]


def _args(argv: list[str]) -> SftArgs:
    return parse_args(SftArgs, "sft", "", argv)


def test_seed_mixed_command_with_local_stand_ins(mirror: Path) -> None:
    args = _args(["--dataset", f"{ZH}#50", f"{EN}#50", "swift/self-cognition#50", *SEED_FLAGS])
    train, val, notes = load_conversations(data_options(args))
    sources = [c.tags["source"] for c in train]
    assert len(train) == 150 and not val and not notes
    assert sources.count(f"{ZH}#50") == sources.count(f"{EN}#50") == 50
    assert any("小黄" in c.messages[-1].content for c in train)
    # Identical runs select identical records.
    again, _, _ = load_conversations(data_options(args))
    assert [c.as_dicts() for c in again] == [c.as_dicts() for c in train]


def test_sample_larger_than_dataset_repeats_it(mirror: Path) -> None:
    train, _, _ = load_conversations(data_options(_args(["--dataset", f"{EN}#100"])))
    texts = [c.messages[0].content for c in train]
    assert len(texts) == 100 and len(set(texts)) == 40


def test_dataset_probs_interleave_in_proportion(mirror: Path) -> None:
    args = _args(
        ["--dataset", ZH, "swift/self-cognition", *SEED_FLAGS, "--dataset_probs", "0.2:0.8"]
    )
    train, _, _ = load_conversations(data_options(args))
    zh = sum(c.tags["source"] == ZH for c in train)
    # The mix stops when the first source runs out: here the 258-record self-cognition set.
    assert 0.1 < zh / len(train) < 0.3
    assert [c.tags["source"] for c in train[:20]] != [ZH] * 20  # interleaved, not concatenated


def test_mix_validates_probabilities() -> None:
    with pytest.raises(UserError, match="2 values for 3 datasets"):
        mix([[1], [2], [3]], [0.5, 0.5], seed=0)  # type: ignore[list-item]
    assert parse_probs("0.4:0.4:0.2") == [0.4, 0.4, 0.2]
    with pytest.raises(UserError, match="dataset_probs"):
        parse_probs("a:b")


def test_split_dataset_ratio_is_seeded(mirror: Path) -> None:
    args = _args(["--dataset", ZH, "--split_dataset_ratio", "0.1", "--seed", "7"])
    train, val, _ = load_conversations(data_options(args))
    assert len(val) == 6 and len(train) == 54
    _, val2, _ = load_conversations(data_options(args))
    assert [c.as_dicts() for c in val2] == [c.as_dicts() for c in val]
    assert split_val(list(range(10)), 0.0, 0) == (list(range(10)), [])  # type: ignore[arg-type]


def test_columns_remap(tmp_path: Path) -> None:
    f = tmp_path / "qa.jsonl"
    _write_jsonl(f, [{"question": "q1", "answer": "a1"}])
    args = _args(["--dataset", str(f), "--columns", '{"question": "query", "answer": "response"}'])
    train, _, _ = load_conversations(data_options(args))
    assert [m.content for m in train[0].messages] == ["q1", "a1"]
    assert parse_columns("question:query,answer:response") == {
        "question": "query",
        "answer": "response",
    }


def test_offline_hub_dataset_is_one_clear_sentence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setitem(sys.modules, "modelscope", None)  # not installed
    code = main(["sft", "--model", "demo", "--dataset", f"{ZH}#500"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert ZH in err and os.path.join("datasets", ZH) in err
    assert "Traceback" not in err


def test_csv_and_parquet_sources(tmp_path: Path) -> None:
    csv_file = tmp_path / "d.csv"
    csv_file.write_text('instruction,input,output\n"hello, you",,"hi\nthere"\nq2,,a2\n', "utf-8")
    train, _, _ = load_conversations(data_options(_args(["--dataset", str(csv_file)])))
    assert [c.origin for c in train] == [f"{csv_file}:2", f"{csv_file}:4"]
    assert train[0].messages[1].content == "hi\nthere"
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.table({"query": ["q"], "response": ["r"]}), tmp_path / "d.parquet")
    args = _args(["--dataset", str(tmp_path / "d.parquet")])
    train, _, _ = load_conversations(data_options(args))
    assert train[0].origin.endswith("d.parquet:1")


@pytest.mark.slow  # trains the tiny model
def test_seed_mixed_command_trains_end_to_end(mirror: Path, tiny_model_dir: Path) -> None:
    """The seed's mixed `swift sft` command, `swift` -> `tunesmith`, on the tiny model."""
    out = mirror.parent / "output"
    code = main(
        ["sft", "--model", str(tiny_model_dir), "--train_type", "lora",
         "--dataset", f"{ZH}#20", f"{EN}#20", "swift/self-cognition#20",
         "--dataset_probs", "0.4:0.4:0.2", "--torch_dtype", "float32",
         "--num_train_epochs", "1", "--per_device_train_batch_size", "1",
         "--learning_rate", "1e-4", "--lora_rank", "8", "--lora_alpha", "32",
         "--target_modules", "all-linear", "--gradient_accumulation_steps", "16",
         "--eval_steps", "50", "--save_steps", "50", "--save_total_limit", "5",
         "--logging_steps", "5", "--max_length", "2048", "--output_dir", str(out),
         "--system", "You are a helpful assistant.", "--warmup_ratio", "0.05",
         "--report_to", "none", *SEED_FLAGS]
    )  # fmt: skip
    assert code == 0
    (run,) = out.glob("v0-*")
    args = json.loads((run / "args.json").read_text(encoding="utf-8"))
    assert args["dataset_probs"] == "0.4:0.4:0.2"
    assert [p.name for p in run.glob("checkpoint-*")]
