"""``tunesmith infer --val_dataset`` on llama.cpp (tiny random Qwen2): greedy requests are decoded
several sequences together (``infer/llamacpp_batch.py``) and write the very file the
one-at-a-time path writes; sampling requests still go one at a time, seeded and repeatable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llamacpp_util import needs_llama_cpp
from tunesmith.cli import main

pytestmark = pytest.mark.usefixtures("isolated_torch")
QUESTIONS = ["Say hello.", "你好, who are you?", "Echo 3.", "Count: 1 2 3", "Why?", "Hi", "7?"]


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """Records of different lengths, some with a reference reply, one with its own system."""
    rows: list[dict] = []
    for i, q in enumerate(QUESTIONS):
        msgs = [{"role": "user", "content": q * (1 + i % 3)}]
        if i % 2:
            msgs.append({"role": "assistant", "content": f"ref {i}"})
        if i == 3:
            msgs.insert(0, {"role": "system", "content": "Be terse."})
        rows.append({"messages": msgs})
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    return path


def run_infer(model: Path, data: Path, out: Path, *flags: str) -> list[str]:
    """The result file's lines after ``tunesmith infer --infer_backend llamacpp``."""
    argv = ["infer", "--model", str(model), "--infer_backend", "llamacpp", "--val_dataset",
            str(data), "--result_path", str(out), "--max_new_tokens", "12", *flags]  # fmt: skip
    assert main(argv) == 0
    return out.read_text("utf-8").splitlines()


@needs_llama_cpp
@pytest.mark.parametrize("extra", [[], ["--repetition_penalty", "1.3"]])
def test_greedy_parallel_file_equals_sequential(
    tiny_model_dir, dataset, tmp_path, monkeypatch, extra: list[str]
) -> None:
    from tunesmith.infer import llamacpp_batch

    calls: list[int] = []
    real = llamacpp_batch.generate_parallel

    def spy(engine, convs, gen, parallel, on_done=None):
        calls.append(parallel)
        return real(engine, convs, gen, parallel, on_done)

    monkeypatch.setattr(llamacpp_batch, "generate_parallel", spy)
    greedy = ["--temperature", "0", *extra]
    parallel = run_infer(tiny_model_dir, dataset, tmp_path / "par.jsonl", *greedy)
    three = run_infer(tiny_model_dir, dataset, tmp_path / "p3.jsonl", *greedy,
                      "--max_batch_size", "3")  # fmt: skip
    assert calls == [16, 3]  # the default, then --max_batch_size as the parallel sequences
    monkeypatch.setattr(llamacpp_batch, "sequential_reason", lambda engine, gen: "the test")
    sequential = run_infer(tiny_model_dir, dataset, tmp_path / "seq.jsonl", *greedy)
    assert calls == [16, 3]
    assert parallel == sequential == three
    rows = [json.loads(line) for line in parallel]
    assert [r["messages"][-1]["content"] for r in rows] == [
        q * (1 + i % 3) for i, q in enumerate(QUESTIONS)
    ]
    assert [r.get("labels") for r in rows] == [f"ref {i}" if i % 2 else None
                                               for i in range(len(QUESTIONS))]  # fmt: skip
    assert any(r["response"] for r in rows)


@needs_llama_cpp
def test_sampling_goes_one_at_a_time_and_repeats(
    tiny_model_dir, dataset, tmp_path, monkeypatch
) -> None:
    from tunesmith.infer import llamacpp_batch

    def refuse(*a, **k):
        raise AssertionError("sampling must not take the parallel path")

    monkeypatch.setattr(llamacpp_batch, "generate_parallel", refuse)
    flags = ["--temperature", "0.9", "--top_k", "20", "--seed", "7", "--max_batch_size", "4"]
    first = run_infer(tiny_model_dir, dataset, tmp_path / "a.jsonl", *flags)
    again = run_infer(tiny_model_dir, dataset, tmp_path / "b.jsonl", *flags)
    assert first == again and len(first) == len(QUESTIONS)
    rows = [json.loads(line) for line in first]
    assert [r["messages"][-1]["content"] for r in rows] == [
        q * (1 + i % 3) for i, q in enumerate(QUESTIONS)
    ]


def test_stop_strings_and_sampling_are_sequential() -> None:
    """Which requests generate_parallel takes (no llama.cpp needed)."""
    from types import SimpleNamespace

    from tunesmith.infer.llamacpp_batch import sequential_reason
    from tunesmith.infer.llamacpp_sampling import GenOptions

    plain = SimpleNamespace(defaults={})  # a bare GGUF: greedy unless told otherwise
    sampling = SimpleNamespace(defaults={"do_sample": True, "temperature": 0.7})
    assert sequential_reason(plain, GenOptions(repetition_penalty=1.2)) is None
    assert sequential_reason(sampling, GenOptions(temperature=0)) is None
    assert sequential_reason(sampling, GenOptions()) == "sampling"
    assert sequential_reason(plain, GenOptions(temperature=0.5)) == "sampling"
    assert sequential_reason(plain, GenOptions(temperature=0, stop=["\n"])) == "stop strings"
