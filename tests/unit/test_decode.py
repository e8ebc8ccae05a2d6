"""The hand-written fast decode loop (infer/decode.py) against ``model.generate``."""

from __future__ import annotations

import io

import pytest
import torch

from tunesmith.infer import decode
from tunesmith.infer.engine import Engine, generate, generate_tokens

pytestmark = pytest.mark.usefixtures("isolated_torch")

GREEDY = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}


@pytest.fixture(scope="module")
def tok(tiny_tokenizer):
    return tiny_tokenizer


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model


def prompt(tok, text: str) -> torch.Tensor:
    return torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])


def reference(model, ids: torch.Tensor, **kw) -> list[int]:
    out = model.generate(ids, attention_mask=torch.ones_like(ids), **GREEDY, **kw)
    return out[0, ids.shape[1] :].tolist()


def refuse(*args, **kwargs):
    raise AssertionError("fell back to model.generate")


def fast(model, ids: torch.Tensor, streamer=None, **kw) -> list[int]:
    """Through the engine's fast path, which must take the hand-written loop."""
    eng = Engine(model, None, None, torch.device("cpu"), True)
    model.generate = refuse  # an instance attribute: the class's generate is untouched
    try:
        new = generate_tokens(eng, ids, torch.ones_like(ids), GREEDY | kw, streamer)
    finally:
        del model.generate
    return new[0].tolist()


TEXTS = ["Hello, world!", "The quick brown fox jumps over the lazy dog. " * 3, "你好"]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("new", [1, 7, 40])
def test_greedy_equals_generate(model, tok, text, new):
    ids = prompt(tok, text)
    assert fast(model, ids, max_new_tokens=new) == reference(model, ids, max_new_tokens=new)


def eos_model(tok, model, ids: torch.Tensor, at: int):
    """The test model with its EOS set to the token greedy decoding makes at step ``at``."""
    import copy

    toks = reference(model, ids, max_new_tokens=at + 1)
    m = copy.deepcopy(model)
    m.generation_config.eos_token_id = [toks[at], 999_999]
    return m, toks[at]


@pytest.mark.parametrize("at", [0, 5, 20])
def test_stops_at_eos_like_generate(model, tok, at):
    ids = prompt(tok, TEXTS[1])
    m, eos = eos_model(tok, model, ids, at)
    ref = reference(m, ids, max_new_tokens=60)
    got = fast(m, ids, max_new_tokens=60)
    assert got == ref
    assert eos in got and got.index(eos) == len(got) - 1


def test_min_new_tokens_bans_eos_like_generate(model, tok):
    ids = prompt(tok, TEXTS[1])
    m, _ = eos_model(tok, model, ids, 3)
    kw = {"max_new_tokens": 30, "min_new_tokens": 10}
    assert fast(m, ids, **kw) == reference(m, ids, **kw)


def test_peft_unmerged_lora(model, tok):
    import copy

    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    pm = get_peft_model(copy.deepcopy(model), cfg).eval()
    ids = prompt(tok, TEXTS[0])
    ref = reference(pm, ids, max_new_tokens=25)
    assert ref != reference(model, ids, max_new_tokens=25)  # the adapter matters
    assert fast(pm, ids, max_new_tokens=25) == ref
    # The LoRA layers trace into one graph too (the CUDA path's compile, eager backend).
    torch._dynamo.reset()
    plan = decode.decode_plan(pm, GREEDY | {"max_new_tokens": 25})
    got = decode.fast_generate(pm, ids, plan, compile_step=True, backend="eager")
    assert got[0].tolist() == ref
    step = decode._state(pm.get_base_model()).steps[(plan.sampling, True, "eager")]
    assert "_or_uncompiled" in step.__qualname__  # it compiled: not replaced by eager
    merged = pm.merge_and_unload()
    assert fast(merged, ids, max_new_tokens=25) == ref


class Collect:
    def __init__(self) -> None:
        self.puts: list[list[int]] = []

    def put(self, value: torch.Tensor) -> None:
        self.puts.append(value.reshape(-1).tolist())

    def end(self) -> None:
        self.puts.append([])


def test_streaming_same_tokens_and_text(model, tok):
    ids = prompt(tok, TEXTS[0])
    m, _ = eos_model(tok, model, ids, 12)
    got, ref = Collect(), Collect()
    toks = fast(m, ids, streamer=got, max_new_tokens=30)
    m.generate(ids, attention_mask=torch.ones_like(ids), **GREEDY, max_new_tokens=30, streamer=ref)
    assert got.puts == ref.puts
    assert [t for put in got.puts[1:] for t in put] == toks

    m.generation_config.eos_token_id = tok.eos_token_id
    eng = Engine(m, tok, None, torch.device("cpu"), True)
    slow = Engine(m, tok, None, torch.device("cpu"), False)
    msgs = [{"role": "user", "content": "Hello"}]
    kw = GREEDY | {"max_new_tokens": 20, "pad_token_id": tok.pad_token_id}
    out_fast, out_slow = io.StringIO(), io.StringIO()
    a = generate(eng, msgs, kw, stream_to=out_fast)
    b = generate(slow, msgs, kw, stream_to=out_slow)
    assert a == b and out_fast.getvalue() == out_slow.getvalue()


def test_sampling_runs_and_top_k_1_is_greedy(model, tok):
    ids = prompt(tok, TEXTS[1])
    torch.manual_seed(0)
    kw = {"do_sample": True, "temperature": 0.8, "top_k": 1, "top_p": None, "max_new_tokens": 20}
    assert fast(model, ids, **kw) == reference(model, ids, max_new_tokens=20)
    plan = decode.decode_plan(model, kw | {"top_k": 50, "top_p": 0.9})
    assert plan is not None and plan.sampling.do_sample
    torch.manual_seed(1)
    a = decode.fast_generate(model, ids, plan)
    torch.manual_seed(1)
    b = decode.fast_generate(model, ids, plan)
    assert a.shape == (1, 20) and a.tolist() == b.tolist()  # seeded: reproducible
    assert int(a.max()) < model.config.vocab_size


@pytest.mark.parametrize("penalty", [1.3, 0.8])
def test_repetition_penalty_equals_generate(model, tok, penalty):
    ids = prompt(tok, TEXTS[1])
    kw = {"max_new_tokens": 40, "repetition_penalty": penalty}
    ref = reference(model, ids, **kw)
    assert ref != reference(model, ids, max_new_tokens=40)  # the penalty matters
    assert fast(model, ids, **kw) == ref
    torch._dynamo.reset()
    plan = decode.decode_plan(model, GREEDY | kw)
    got = decode.fast_generate(model, ids, plan, compile_step=True, backend="eager")
    assert got[0].tolist() == ref


def test_unsupported_requests_fall_back(model):
    assert decode.decode_plan(model, {"max_new_tokens": 5, "num_beams": 2}) is None
    assert decode.decode_plan(model, {"max_new_tokens": 5, "no_repeat_ngram_size": 3}) is None
    assert decode.decode_plan(model, {"max_new_tokens": 5, "repetition_penalty": 1.1})


def test_cache_reused_across_prompt_lengths(model, tok):
    a, b = prompt(tok, TEXTS[0]), prompt(tok, TEXTS[1])
    fast(model, a, max_new_tokens=5)
    cache = decode._state(model).cache
    assert fast(model, b, max_new_tokens=5) == reference(model, b, max_new_tokens=5)
    assert decode._state(model).cache is cache  # same bucket: reset, not rebuilt


def test_compiled_step_is_one_graph(model, tok):
    """The step traces with fullgraph=True (a graph break raises): the CUDA path's compile,
    with the eager backend so no compiler runs here; greedy output is unchanged."""
    torch._dynamo.reset()
    ids = prompt(tok, TEXTS[0])
    plan = decode.decode_plan(model, GREEDY | {"max_new_tokens": 12})
    from torch._dynamo.utils import counters

    got = decode.fast_generate(model, ids, plan, compile_step=True, backend="eager")
    assert got[0].tolist() == reference(model, ids, max_new_tokens=12)
    # A graph break raises under fullgraph, and the loop would then fall back to the
    # uncompiled step with a warning: a graph was really made, and nothing fell back.
    assert counters["stats"]["unique_graphs"] >= 1
    compiled = decode._state(model).steps[(plan.sampling, True, "eager")]
    assert "_or_uncompiled" in compiled.__qualname__  # not replaced by the eager step
    other = prompt(tok, TEXTS[1])  # another prompt length: no recompile expected
    before = dict(counters["stats"])
    got = decode.fast_generate(model, other, plan, compile_step=True, backend="eager")
    assert got[0].tolist() == reference(model, other, max_new_tokens=12)
    assert counters["stats"]["unique_graphs"] == before.get("unique_graphs", 0)


def test_compile_failure_falls_back_to_uncompiled(model, tok, caplog):
    def broken(gm, example_inputs):
        raise RuntimeError("no compiler here")

    torch._dynamo.reset()
    ids = prompt(tok, TEXTS[0])
    plan = decode.decode_plan(model, GREEDY | {"max_new_tokens": 10})
    got = decode.fast_generate(model, ids, plan, compile_step=True, backend=broken)
    assert got[0].tolist() == reference(model, ids, max_new_tokens=10)
    assert "decoding uncompiled" in caplog.text
