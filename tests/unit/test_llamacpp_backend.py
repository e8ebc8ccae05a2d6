"""The llamacpp backend on the tiny random Qwen2: the GGUF export is made once and cached, answers
follow pt's sampling rules, streaming equals non-streaming, batches keep input order, the auto
choice of backend, and bad input is one sentence with exit 2 and nothing half-written."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from llamacpp_util import first_divergence, needs_llama_cpp
from tunesmith.cli import main, parse_args
from tunesmith.config import InferCommandArgs
from tunesmith.infer.llamacpp_backend import choose_backend
from tunesmith.infer.llamacpp_sampling import GenOptions, Sampling, resolve_sampling, token_probs

pytestmark = pytest.mark.usefixtures("isolated_torch")
QUESTIONS = ["Say hello.", "你好, who are you?", "Echo 3.", "Count: 1 2 3", "Why?"]


def infer_args(*argv: str) -> InferCommandArgs:
    return parse_args(InferCommandArgs, "infer", "", list(argv))


# --- sampling: the same rules as transformers' generate (no llama.cpp needed) ---------------


def test_resolve_sampling_follows_pt() -> None:
    cfg = {"do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": 0.8,
           "repetition_penalty": 1.05}  # fmt: skip
    assert resolve_sampling(GenOptions(), cfg) == Sampling(True, 0.7, 20, 0.8, 1.05)
    greedy = resolve_sampling(GenOptions(temperature=0), cfg)
    assert not greedy.do_sample and greedy.repetition_penalty == 1.05  # generate keeps it
    assert resolve_sampling(GenOptions(top_k=5), cfg).top_k == 5
    assert not resolve_sampling(GenOptions(), {}).do_sample  # no generation config: greedy
    assert resolve_sampling(GenOptions(temperature=0.5), {}) == Sampling(True, 0.5, 50, 1.0, 1.0)


@pytest.mark.parametrize(("temp", "top_k", "top_p", "rp"),
                         [(0.7, 20, 0.8, 1.3), (1.0, 0, 0.5, 1.0), (1.5, 7, 1.0, 0.9)])  # fmt: skip
def test_token_probs_equal_transformers_warpers(temp, top_k, top_p, rp) -> None:
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    gen = np.random.default_rng(0)
    logits = (gen.standard_normal(500) * 3).astype(np.float32)
    prompt = gen.integers(0, 500, 40)
    seen = np.zeros(500, dtype=bool)
    seen[prompt] = True
    ids, probs = token_probs(logits.copy(), seen, Sampling(True, temp, top_k, top_p, rp))

    input_ids = torch.from_numpy(prompt)[None]
    scores = RepetitionPenaltyLogitsProcessor(rp)(input_ids, torch.tensor(logits)[None])
    scores = TemperatureLogitsWarper(temp)(input_ids, scores)
    if top_k:
        scores = TopKLogitsWarper(top_k)(input_ids, scores)
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(input_ids, scores)
    expect = torch.softmax(scores[0].double(), -1).numpy()
    assert set(ids.tolist()) == set(np.flatnonzero(expect).tolist())
    np.testing.assert_allclose(probs, expect[ids], rtol=1e-5)
    # Greedy: the argmax after the penalty, as generate does with do_sample=False.
    (greedy,), _ = token_probs(logits.copy(), seen, Sampling(False, 1.0, 0, 1.0, rp))
    penalised = RepetitionPenaltyLogitsProcessor(rp)(input_ids, torch.tensor(logits)[None])
    assert greedy == int(penalised.argmax())


# --- the auto choice -------------------------------------------------------------------------


@pytest.fixture
def log_lines():
    """tunesmith's log messages during the test (whatever the logger's earlier set-up)."""
    import logging

    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    log = logging.getLogger("tunesmith")
    old = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    yield lines
    log.removeHandler(handler)
    log.setLevel(old)


def test_auto_is_pt_without_llama_cpp(tiny_model_dir, monkeypatch, log_lines) -> None:
    import importlib.util

    real = importlib.util.find_spec

    def find_spec(name: str, *a):
        return None if name == "llama_cpp" else real(name, *a)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    assert choose_backend(infer_args("--model", str(tiny_model_dir))) == "pt"
    (line,) = log_lines
    assert line.startswith("inference backend: pt") and "tunesmith[llamacpp]" in line


def test_auto_is_pt_on_cuda_and_explicit_choice_wins(tiny_model_dir, monkeypatch) -> None:
    assert choose_backend(infer_args("--model", "x", "--infer_backend", "pt")) == "pt"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert choose_backend(infer_args("--model", str(tiny_model_dir))) == "pt"


@needs_llama_cpp
def test_auto_picks_llamacpp_unless_a_pt_only_flag(tiny_model_dir, log_lines) -> None:
    assert choose_backend(infer_args("--model", str(tiny_model_dir))) == "llamacpp"
    assert log_lines[-1].startswith("inference backend: llamacpp")
    for flag in (["--torch_dtype", "float32"], ["--fast_decode", "true"], ["--merge_lora", "true"]):
        assert choose_backend(infer_args("--model", str(tiny_model_dir), *flag)) == "pt"
    assert log_lines[1].startswith("inference backend: pt (for --torch_dtype float32")


# --- answers on llama.cpp --------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    """The tiny model on llama.cpp (exported once to an f16 GGUF file in the test cache)."""
    from tunesmith.infer.llamacpp_backend import load_llamacpp

    return load_llamacpp(infer_args("--model", str(tiny_model_dir), "--infer_backend", "llamacpp"))


def msgs(q: str, system: str | None = None) -> list[dict[str, str]]:
    return ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": q}
    ]


@needs_llama_cpp
def test_greedy_answers_equal_pt_or_differ_at_a_near_tie(engine, tiny_model_dir) -> None:
    """The tiny random model's greedy ids on llama.cpp (f16 GGUF) and pt (fp32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.infer.llamacpp_backend import generate_ids, render_prompt

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    gen = GenOptions(max_new_tokens=12, temperature=0)
    same = 0
    for q in QUESTIONS:
        text = tok.apply_chat_template(msgs(q), tokenize=False, add_generation_prompt=True)
        prompt = tok(text, add_special_tokens=False)["input_ids"]
        assert render_prompt(engine, msgs(q)) == prompt  # same template, same token ids
        out = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)
        pt_ids = [t for t in out[0, len(prompt) :].tolist() if t != tok.eos_token_id]
        d = first_divergence(model, prompt, pt_ids, list(generate_ids(engine, msgs(q), gen)),
                             tok.eos_token_id)  # fmt: skip
        if d is None:
            same += 1
        else:  # f16 weights: only a near-tie of pt's top two may flip
            assert d.rank == 1 and d.gap < 0.02, d
    assert same >= len(QUESTIONS) - 1


@needs_llama_cpp
def test_streaming_equals_non_streaming_and_cache_reuse(engine) -> None:
    gen = GenOptions(max_new_tokens=16, temperature=0)
    whole = engine.generate(msgs("Say hello."), gen)
    pieces = list(engine.stream(msgs("Say hello."), gen))
    assert len(pieces) > 1 and "".join(pieces) == whole
    engine.generate(msgs("Something else entirely."), gen)  # the KV cache now holds another
    assert engine.generate(msgs("Say hello."), gen) == whole


@needs_llama_cpp
def test_stop_strings_end_the_answer_and_are_not_included(engine) -> None:
    gen = GenOptions(max_new_tokens=24, temperature=0)
    whole = engine.generate(msgs("Count: 1 2 3"), gen)
    stop = whole[len(whole) // 2 :].strip()[:2]  # somewhere in the middle of the answer
    assert stop, whole
    gen.stop = [stop]
    cut = whole[: whole.find(stop)]
    assert engine.generate(msgs("Count: 1 2 3"), gen) == cut
    assert "".join(engine.stream(msgs("Count: 1 2 3"), gen)) == cut


@needs_llama_cpp
def test_seeded_sampling_repeats(engine) -> None:
    def sample(seed: int) -> str:
        return engine.generate(msgs("Why?"), GenOptions(max_new_tokens=12, temperature=1.0,
                                                         seed=seed))  # fmt: skip

    assert sample(1) == sample(1)
    assert len({sample(s) for s in range(4)}) > 1


@needs_llama_cpp
def test_cli_adapters_export_once_beside_the_checkpoint(
    checkpoint, capsys, monkeypatch, log_lines
) -> None:
    from tunesmith.infer.llamacpp_backend import load_llamacpp

    argv = ["infer", "--adapters", str(checkpoint), "--temperature", "0", "--max_new_tokens", "6"]
    monkeypatch.setattr("sys.stdin", io.StringIO("Echo 3.\nSay hi.\n"))
    assert main([*argv, "--infer_backend", "llamacpp"]) == 0
    first = capsys.readouterr().out
    (gguf,) = checkpoint.parent.glob(f"{checkpoint.name}-merged-f16-*.gguf")
    stamp = gguf.stat().st_mtime_ns
    monkeypatch.setattr("sys.stdin", io.StringIO("Echo 3.\nSay hi.\n"))
    assert main(argv) == 0  # auto: llama.cpp again, on the cached file
    assert capsys.readouterr().out == first
    assert any(line.startswith("inference backend: llamacpp") for line in log_lines)
    assert any("using the cached GGUF file" in line for line in log_lines)
    assert gguf.stat().st_mtime_ns == stamp
    assert not [p for p in checkpoint.parent.iterdir() if p.name.startswith(".tmp")]
    # The run's system prompt is used, and the answers are the engine's.
    eng = load_llamacpp(infer_args("--adapters", str(checkpoint)))
    assert eng.system == "Be terse."
    gen = GenOptions(max_new_tokens=6, temperature=0)
    for q in ("Echo 3.", "Say hi."):
        assert f"<<< {q}\n{eng.generate(msgs(q, 'Be terse.'), gen)}" in first


@needs_llama_cpp
def test_cli_batch_keeps_input_order(engine, tiny_model_dir, tmp_path) -> None:
    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps({"query": q}) + "\n" for q in QUESTIONS), "utf-8")
    out = tmp_path / "out.jsonl"
    argv = ["infer", "--model", str(tiny_model_dir), "--infer_backend", "llamacpp"]
    argv += ["--temperature", "0", "--max_new_tokens", "8", "--val_dataset", str(data)]
    assert main([*argv, "--result_path", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text("utf-8").splitlines()]
    assert [r["messages"][-1]["content"] for r in rows] == QUESTIONS
    gen = GenOptions(max_new_tokens=8, temperature=0)
    assert [r["response"] for r in rows] == [engine.generate(msgs(q), gen) for q in QUESTIONS]
    assert engine.generate_many([msgs(q) for q in QUESTIONS[::-1]], gen, progress=False) == [
        r["response"] for r in rows[::-1]
    ]


# --- bad input -------------------------------------------------------------------------------


def run(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def test_missing_llama_cpp_is_one_sentence(tiny_model_dir, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp raises ImportError
    code, err = run(capsys, "infer", "--model", str(tiny_model_dir), "--infer_backend", "llamacpp")
    assert code == 2
    assert "needs llama-cpp-python" in err and "pip install 'tunesmith[llamacpp]'" in err
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1


@needs_llama_cpp
def test_unsupported_architecture_is_one_sentence(tmp_path, capsys) -> None:
    import gguf

    from tiny import CHAT_TEMPLATE

    path = tmp_path / "odd.gguf"
    w = gguf.GGUFWriter(str(path), "notanarch")
    w.add_context_length(128)
    w.add_chat_template(CHAT_TEMPLATE)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    code, err = run(capsys, "infer", "--model", str(path), "--infer_backend", "llamacpp")
    assert code == 2 and "cannot load this GGUF file (architecture 'notanarch')" in err


@needs_llama_cpp
def test_context_longer_than_max_model_len(tiny_model_dir, capsys, monkeypatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("Tell me a long story about a cat.\n"))
    argv = ["infer", "--model", str(tiny_model_dir), "--infer_backend", "llamacpp"]
    code, err = run(capsys, *argv, "--max_model_len", "16")
    assert code == 2 and "more than --max_model_len 16" in err
    code, err = run(capsys, *argv, "--max_model_len", "100000")
    assert code == 2 and "more than the context length" in err


@pytest.fixture(scope="module")
def misfit(tiny_model_dir: Path, tmp_path_factory) -> tuple[Path, Path]:
    """(a LoRA adapter of the tiny model, a base of another shape it cannot merge into)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    adapter = tmp_path_factory.mktemp("run") / "checkpoint-2"
    get_peft_model(model, LoraConfig(r=4, target_modules="all-linear")).save_pretrained(adapter)
    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.hidden_size, config.intermediate_size = 32, 64
    other = tmp_path_factory.mktemp("other") / "other-base"
    AutoModelForCausalLM.from_config(config).save_pretrained(other)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(other)
    return adapter, other


@needs_llama_cpp
def test_unmergeable_adapter_writes_nothing(misfit, capsys) -> None:
    adapter, other = misfit
    code, err = run(capsys, "infer", "--model", str(other), "--adapters", str(adapter),
                    "--infer_backend", "llamacpp")  # fmt: skip
    assert code == 2 and f"--adapters {adapter}: does not fit the base model" in err
    assert sorted(p.name for p in adapter.parent.iterdir()) == ["checkpoint-2"]


@needs_llama_cpp
def test_interrupted_export_leaves_no_file(misfit, tiny_model_dir, monkeypatch) -> None:
    adapter, _ = misfit

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("tunesmith.model.gguf_write._add_tensors", boom)
    code = main(["infer", "--model", str(tiny_model_dir), "--adapters", str(adapter),
                 "--infer_backend", "llamacpp"])  # fmt: skip
    assert code == 130  # Ctrl-C during the export
    assert sorted(p.name for p in adapter.parent.iterdir()) == ["checkpoint-2"]


@needs_llama_cpp
def test_load_primes_the_shared_prompt_start(engine) -> None:
    """At load, llama.cpp already holds the prompt start of every first turn (the template's
    header and default system prompt), so a first answer evaluates only the user's words,
    and the answer is the same as from a cold cache."""
    from tunesmith.infer.llamacpp_backend import prime, render_prompt, shared_prefix

    prime(engine)
    n = engine.llm.n_tokens
    assert n == len(shared_prefix(engine, engine.system)) > 0
    for q in ("Say hello.", "你好"):
        assert render_prompt(engine, msgs(q))[:n] == engine.llm.input_ids[:n].tolist()
    gen = GenOptions(max_new_tokens=10, temperature=0)
    primed = engine.generate(msgs("Why?"), gen)
    engine.llm.n_tokens = 0  # cold
    assert engine.generate(msgs("Why?"), gen) == primed


@needs_llama_cpp
def test_unsupported_hf_architecture_writes_nothing(tiny_model_dir, tmp_path, capsys) -> None:
    """A model directory the GGUF writer cannot convert: one sentence, exit 2, and nothing
    (not even a temporary file) in the GGUF cache."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from tunesmith.utils import cache_dir

    model_dir = tmp_path / "tiny-gpt2"
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=1, n_head=2, n_positions=64)
    GPT2LMHeadModel(config).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    before = sorted((cache_dir() / "gguf").glob("*")) if (cache_dir() / "gguf").is_dir() else []
    code, err = run(capsys, "infer", "--model", str(model_dir), "--infer_backend", "llamacpp")
    assert code == 2 and "does not support the architecture 'gpt2'" in err
    after = sorted((cache_dir() / "gguf").glob("*")) if (cache_dir() / "gguf").is_dir() else []
    assert after == before
