"""Integration: the llamacpp backend on the demo model answers as the pt backend (fp32) does.

The demo model is exported once to an f16 GGUF file (cached with the demo model). Greedy
answers to a fixed prompt set must be pt's token for token, or leave them only where pt's top
two logits are a near tie that f16 rounding can flip: at a prompt's last position llama.cpp's
logits are within ``F16_LOGIT_ERROR`` of pt's (asserted below), so two tokens whose pt logits
differ by less than twice that may swap, and nothing else may.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from llamacpp_util import first_divergence, needs_llama_cpp
from tunesmith.cli import parse_args
from tunesmith.config import InferCommandArgs
from tunesmith.infer.llamacpp_backend import GenOptions, generate_ids, render_prompt

pytestmark = needs_llama_cpp

PROMPTS = [
    "你是谁?", "Who are you?", "用一句话解释什么是机器学习。", "What is 2+2?",
    "Write a haiku about autumn.", "List three uses of Python.",
]  # fmt: skip
NEW_TOKENS = 32
F16_LOGIT_ERROR = 0.05
"""Largest |llama.cpp f16 logit - pt fp32 logit| allowed at a prompt's last position. The
weights are bf16 (exact in f16 but for tiny values) and llama.cpp rounds activations to f16 in
its matrix products; measured on the demo prompts (2026-12-03): at most 0.013."""


@pytest.fixture(scope="module")
def demo_dir() -> Path:
    """The demo model's HF directory, in the user's cache as test_demo_model.py does."""
    from tunesmith.model.load import resolve_model

    root = os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))
    os.environ["TUNESMITH_CACHE"] = os.environ.get(
        "TUNESMITH_TEST_MODEL_CACHE", os.path.join(root, "tunesmith")
    )
    return resolve_model("demo")


@pytest.fixture(scope="module")
def llama(demo_dir: Path):
    """The demo model on llama.cpp (f16 GGUF, exported once and cached)."""
    from tunesmith.infer.llamacpp_backend import load_llamacpp

    argv = ["--model", "demo", "--infer_backend", "llamacpp", "--gguf_type", "f16"]
    return load_llamacpp(parse_args(InferCommandArgs, "infer", "", argv))


@pytest.fixture(scope="module")
def pt(demo_dir: Path):
    """(fp32 model, tokenizer): the pt backend's reference."""
    from transformers import AutoModelForCausalLM

    from tunesmith.model.load import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(demo_dir, dtype=torch.float32).eval()
    return model, load_tokenizer(demo_dir)


def msgs(q: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": q}]


@torch.inference_mode()
def test_logits_at_the_prompt_are_pts_within_f16_rounding(llama, pt) -> None:
    import llama_cpp
    import numpy as np

    from tunesmith.infer.llamacpp_backend import _prefill

    model, _ = pt
    worst = 0.0
    for q in PROMPTS:
        ids = render_prompt(llama, msgs(q))
        _prefill(llama.llm, ids)
        ptr = llama_cpp.llama_get_logits_ith(llama.llm.ctx, -1)
        got = np.ctypeslib.as_array(ptr, shape=(llama.llm.n_vocab(),)).copy()
        want = model(torch.tensor([ids])).logits[0, -1].numpy()
        worst = max(worst, float(np.abs(got[: want.size] - want).max()))
    print(f"largest |llama.cpp f16 - pt fp32| logit at the prompts' ends: {worst:.4f}")
    assert worst < F16_LOGIT_ERROR


@torch.inference_mode()
def test_greedy_answers_equal_pt(llama, pt) -> None:
    model, tok = pt
    gen = GenOptions(max_new_tokens=NEW_TOKENS, temperature=0)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    report = []
    for q in PROMPTS:
        text = tok.apply_chat_template(msgs(q), tokenize=False, add_generation_prompt=True)
        prompt = tok(text, add_special_tokens=False)["input_ids"]
        assert render_prompt(llama, msgs(q)) == prompt  # the GGUF's template and tokenizer
        out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False)
        pt_ids = [t for t in out[0, len(prompt) :].tolist() if t not in (eos, tok.eos_token_id)]
        llama_ids = list(generate_ids(llama, msgs(q), gen))
        d = first_divergence(model, prompt, pt_ids, llama_ids, eos)
        report.append((q, d))
        if d is None:
            assert llama.generate(msgs(q), gen) == tok.decode(pt_ids, skip_special_tokens=True)
        else:
            assert d.rank == 1 and d.gap < 2 * F16_LOGIT_ERROR, (q, d)
    print("\n".join(f"{q!r}: {'same' if d is None else d}" for q, d in report))


def test_batch_keeps_order_and_streaming_equals_the_answer(llama) -> None:
    gen = GenOptions(max_new_tokens=16, temperature=0)
    convs = [msgs(q) for q in PROMPTS[:3]]
    one_by_one = [llama.generate(m, gen) for m in convs]
    assert all(a.strip() for a in one_by_one)
    assert llama.generate_many(convs[::-1], gen, progress=False) == one_by_one[::-1]
    for m, answer in zip(convs[:1], one_by_one, strict=False):
        pieces = list(llama.stream(m, gen))
        assert len(pieces) > 1 and "".join(pieces) == answer
