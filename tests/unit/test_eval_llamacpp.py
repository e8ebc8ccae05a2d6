"""``tunesmith eval --infer_backend llamacpp`` and ``--dataset base-answers`` on the tiny random
Qwen2: several sequences decoded together give the one-at-a-time answers in input order, the
eval's answers are cached under a key that names the backend (never mixed with pt's), and the
base model's answers are generated once per base model and cached."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llamacpp_util import needs_llama_cpp
from tunesmith.cli import main, parse_args
from tunesmith.config import InferCommandArgs, SftArgs
from tunesmith.eval import base_answers
from tunesmith.infer.llamacpp_backend import GenOptions

pytestmark = pytest.mark.usefixtures("isolated_torch")
QUESTIONS = ["Say hello.", "你好, who are you?", "Echo 3.", "Count: 1 2 3", "Why?", "Hi"]


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    from tunesmith.infer.llamacpp_backend import load_llamacpp

    argv = ["--model", str(tiny_model_dir), "--infer_backend", "llamacpp"]
    return load_llamacpp(parse_args(InferCommandArgs, "infer", "", argv))


@needs_llama_cpp
@pytest.mark.parametrize("parallel", [1, 3, 8])
def test_parallel_answers_equal_one_at_a_time(engine, parallel: int) -> None:
    """Sequences sharing the decode steps (and slots reused as answers end) answer as the
    engine does alone, in input order."""
    from tunesmith.infer.llamacpp_batch import generate_parallel

    convs = [[{"role": "system", "content": "Be terse."}, {"role": "user", "content": q}]
             for q in QUESTIONS]  # fmt: skip
    gen = GenOptions(max_new_tokens=10, temperature=0)
    done: list[int] = []
    out = generate_parallel(engine, convs, gen, parallel, on_done=lambda i, a: done.append(i))
    assert out == [engine.generate(c, gen) for c in convs]
    assert sorted(done) == list(range(len(QUESTIONS)))


def _eval(checkpoint: Path, out: Path, backend: str) -> dict:
    argv = ["eval", "--adapters", str(checkpoint), "--model_name", "小智", "XiaoZhi",
            "--model_author", "星河", "Xinghe", "--eval_output_dir", str(out),
            "--eval_dataset", "identity", "retention", "--eval_limit", "2",
            "--infer_backend", backend]  # fmt: skip
    assert main(argv) == 0
    return json.loads((out / "report.json").read_text("utf-8"))


@needs_llama_cpp
def test_eval_on_llamacpp_caches_apart_from_pt(checkpoint, tmp_path, monkeypatch) -> None:
    from tunesmith.utils import cache_dir

    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))  # no answers from before

    def cached() -> set[str]:
        return {p.name for p in (cache_dir() / "eval").glob("*.jsonl")}

    before = cached()
    first = _eval(checkpoint, tmp_path / "a", "llamacpp")
    assert first["meta"]["backend"] == "llamacpp" and first["meta"]["generated"] is True
    assert first["meta"]["dtype"] == "gguf-f16"
    llama_files = cached() - before
    assert len(llama_files) == 2  # base and tuned
    # The tuned model ran from the merged GGUF file written beside the checkpoint.
    assert list(checkpoint.parent.glob(f"{checkpoint.name}-merged-f16-*.gguf"))
    assert set(first["speed"]) == {r["model"] for r in first["summary"]}
    # A rerun answers from the cache; pt's answers get their own cache files.
    again = _eval(checkpoint, tmp_path / "b", "llamacpp")
    assert again["meta"]["generated"] is False and again["summary"] == first["summary"]
    pt = _eval(checkpoint, tmp_path / "c", "pt")
    assert pt["meta"]["backend"] == "pt" and pt["meta"]["generated"] is True
    assert len(cached() - before - llama_files) == 2


def sft_args(model_dir: Path, *dataset: str) -> SftArgs:
    argv = ["--model", str(model_dir), "--dataset", *dataset, "--system", "Be terse."]
    return parse_args(SftArgs, "sft", "", argv)


def test_base_answers_generated_once_and_cached(tiny_model_dir, monkeypatch) -> None:
    calls: list[int] = []
    real = base_answers.generate

    def counted(args, backend, convs):
        calls.append(len(convs))
        assert convs[0][0] == {"role": "system", "content": args.system}
        return real(args, "pt", convs)  # pt: runs without llama.cpp too

    monkeypatch.setattr(base_answers, "generate", counted)
    monkeypatch.setattr(base_answers, "MAX_NEW_TOKENS", 4)
    args = sft_args(tiny_model_dir, "self-cognition#4", "base-answers#10")
    out = base_answers.expand_base_answers(args)
    path, n = out.dataset[1].rsplit("#", 1)
    assert out.dataset[0] == "self-cognition#4" and n == "10"
    rows = [json.loads(x) for x in Path(path).read_text("utf-8").splitlines()]
    assert len(rows) == len(base_answers.prompts()) == calls[0]
    assert all(set(r) == {"query", "response", "lang"} for r in rows)
    # Cached: the next run reads the file; another system prompt is another file.
    assert base_answers.expand_base_answers(args).dataset == out.dataset and len(calls) == 1
    other = sft_args(tiny_model_dir, "base-answers")
    other.system = "Be kind."
    assert base_answers.expand_base_answers(other).dataset[0] != path and len(calls) == 2
    # Without the name, nothing is generated.
    plain = sft_args(tiny_model_dir, "self-cognition")
    assert base_answers.expand_base_answers(plain) is plain and len(calls) == 2
