"""Batch inference (``infer --val_dataset``) and the fast decode path, on the tiny model."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

from tunesmith.cli import main, parse_args
from tunesmith.config import InferCommandArgs
from tunesmith.data.formats import RecordError, to_conversation
from tunesmith.infer.batch import answer_all, load_prompts
from tunesmith.infer.engine import (
    chat_messages,
    generate,
    generate_batch,
    generation_kwargs,
    load_engine,
)

pytestmark = pytest.mark.usefixtures("isolated_torch")

QUERIES = [
    "Say hello.",
    "What is the capital of France? Please answer with one short sentence.",
    "你好",
    "Write a short poem about the sea, the wind and the stars at night, in four lines.",
    "1 2 3",
]


def infer_args(*argv: str) -> InferCommandArgs:
    return parse_args(InferCommandArgs, "tunesmith infer", "test", list(argv))


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return load_engine(infer_args("--model", str(tiny_model_dir), "--torch_dtype", "float32"))


@pytest.fixture(scope="module")
def gen(engine):
    args = infer_args("--temperature", "0", "--max_new_tokens", "12")
    return generation_kwargs(args, engine.tokenizer)


def one_by_one(engine, gen) -> list[str]:
    return [generate(engine, chat_messages(None, [], q), gen) for q in QUERIES]


def test_batched_greedy_answers_equal_one_by_one(engine, gen) -> None:
    assert engine.model.dtype == torch.float32 and not engine.fast
    single = one_by_one(engine, gen)
    assert sum(bool(a.strip()) for a in single) >= 3  # the comparison is not vacuous
    convs = [chat_messages(None, [], q) for q in QUERIES]
    # Prompts of different lengths share a batch: left padding + mask + position ids.
    assert generate_batch(engine, convs, gen) == single
    # Sorted into batches of 2 (one batch of 1): the order of the answers is the input order.
    assert answer_all(engine, convs, gen, batch_size=2, progress=False) == single


def test_fast_path_greedy_equals_default(engine, gen) -> None:
    single = one_by_one(engine, gen)
    engine.fast = True
    try:
        assert one_by_one(engine, gen) == single
        convs = [chat_messages(None, [], q) for q in QUERIES]
        assert generate_batch(engine, convs, gen) == single
        # Streaming still works with the static cache.
        out = io.StringIO()
        assert generate(engine, convs[1], gen, out) == single[1]
        assert out.getvalue().rstrip("\n") == single[1].rstrip("\n")
    finally:
        engine.fast = False


def test_prompt_only_records(tmp_path) -> None:
    assert len(to_conversation({"instruction": "Hi"}, "w", prompt_only=True).messages) == 1
    conv = to_conversation({"query": "Hi", "response": "Yo"}, "w", prompt_only=True)
    assert [m.role for m in conv.messages] == ["user", "assistant"]
    msgs = {"messages": [{"role": "user", "content": "a"}]}
    assert to_conversation(msgs, "w", prompt_only=True).messages[-1].role == "user"
    with pytest.raises(RecordError):  # training data still needs the reply
        to_conversation({"instruction": "Hi"}, "w")
    with pytest.raises(RecordError):  # and an inference record still needs its question
        to_conversation({"output": "x"}, "w", prompt_only=True)


def write(path: Path, records: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n", "utf-8")
    return path


def test_cli_writes_one_line_per_record_in_order(engine, gen, tiny_model_dir, tmp_path) -> None:
    a = write(
        tmp_path / "a.jsonl",
        [
            {"instruction": QUERIES[0], "output": "hello!"},
            {"query": QUERIES[1]},
            {"messages": [{"role": "user", "content": QUERIES[2]}]},
        ],
    )
    b = write(
        tmp_path / "b.json",
        [
            {
                "conversations": [
                    {"from": "human", "value": QUERIES[3]},
                    {"from": "gpt", "value": "x"},
                ]
            },
            {"instruction": QUERIES[4], "output": ""},
        ],
    )
    out = tmp_path / "res" / "out.jsonl"
    argv = ["infer", "--model", str(tiny_model_dir), "--torch_dtype", "float32"]
    argv += ["--infer_backend", "pt"]  # the reference backend (llamacpp: test_llamacpp_backend)
    argv += ["--temperature", "0", "--max_new_tokens", "12", "--max_batch_size", "2"]
    assert main([*argv, "--val_dataset", str(a), str(b), "--result_path", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text("utf-8").splitlines()]
    assert [r["messages"][-1]["content"] for r in rows] == QUERIES
    assert [r.get("labels") for r in rows] == ["hello!", None, None, "x", None]
    assert all(r["messages"][-1]["role"] == "user" for r in rows)
    assert [r["response"] for r in rows] == one_by_one(engine, gen)
    assert [p.name for p in out.parent.iterdir()] == ["out.jsonl"]  # no temporary left


def test_cli_default_result_path(tiny_model_dir, tmp_path, monkeypatch, caplog) -> None:
    data = write(tmp_path / "d.jsonl", [{"query": "Hi"}])
    monkeypatch.chdir(tmp_path)
    argv = ["infer", "--model", str(tiny_model_dir), "--max_new_tokens", "2"]
    argv += ["--infer_backend", "pt"]  # the reference backend (llamacpp: test_llamacpp_backend)
    assert main([*argv, "--val_dataset", str(data)]) == 0
    written = list((tmp_path / "infer_result").glob("*.jsonl"))
    assert len(written) == 1
    assert f"results go to {Path('infer_result') / written[0].name}" in caplog.text


def test_cli_bad_record_is_file_line_field_and_exit_2(tiny_model_dir, tmp_path, capsys) -> None:
    data = write(tmp_path / "bad.jsonl", [{"query": "ok"}, {"query": 3}])
    out = tmp_path / "out.jsonl"
    argv = ["infer", "--model", str(tiny_model_dir), "--val_dataset", str(data)]
    argv += ["--infer_backend", "pt"]  # the reference backend (llamacpp: test_llamacpp_backend)
    assert main([*argv, "--result_path", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{data}:2: query: expected a string" in err
    assert not out.exists()


def test_a_crash_keeps_the_previous_result_file(tiny_model_dir, tmp_path, monkeypatch) -> None:
    data = write(tmp_path / "d.jsonl", [{"query": "Hi"}, {"query": "Yo"}])
    out = tmp_path / "out.jsonl"
    out.write_text("previous\n", "utf-8")
    calls = []

    def boom(*a, **k):
        calls.append(1)
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr("tunesmith.infer.batch.generate_batch", boom)
    argv = ["infer", "--model", str(tiny_model_dir), "--val_dataset", str(data)]
    argv += ["--infer_backend", "pt"]  # the reference backend (llamacpp: test_llamacpp_backend)
    with pytest.raises(RuntimeError):
        main([*argv, "--result_path", str(out)])
    assert calls and out.read_text("utf-8") == "previous\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_load_prompts_split_the_reference(tmp_path) -> None:
    data = write(
        tmp_path / "m.jsonl",
        [
            {
                "messages": [
                    {"role": "system", "content": "S"},
                    {"role": "user", "content": "q1"},
                    {"role": "assistant", "content": "a1"},
                    {"role": "user", "content": "q2"},
                    {"role": "assistant", "content": "a2"},
                ]
            }
        ],
    )
    (p,) = load_prompts([str(data)])
    assert [m["content"] for m in p.messages] == ["S", "q1", "a1", "q2"]
    assert p.reference == "a2" and p.origin == f"{data}:1"


def test_cli_max_batch_size_zero_is_a_flag_error(tiny_model_dir, tmp_path, capsys) -> None:
    data = write(tmp_path / "d.jsonl", [{"query": "Hi"}])
    argv = ["infer", "--model", str(tiny_model_dir), "--val_dataset", str(data)]
    argv += ["--infer_backend", "pt"]  # the reference backend (llamacpp: test_llamacpp_backend)
    assert main([*argv, "--max_batch_size", "0"]) == 2
    assert "--max_batch_size must be at least 1" in capsys.readouterr().err


def test_cli_unwritable_result_path_fails_before_generating(
    tiny_model_dir, tmp_path, monkeypatch, capsys
) -> None:
    data = write(tmp_path / "d.jsonl", [{"query": "Hi"}])
    blocker = tmp_path / "a-file"
    blocker.write_text("x", "utf-8")
    monkeypatch.setattr("tunesmith.infer.batch.generate_batch", pytest.fail)
    argv = ["infer", "--model", str(tiny_model_dir), "--val_dataset", str(data)]
    argv += ["--infer_backend", "pt"]  # the reference backend (llamacpp: test_llamacpp_backend)
    assert main([*argv, "--result_path", str(blocker / "out.jsonl")]) == 2
    assert "cannot write there" in capsys.readouterr().err
