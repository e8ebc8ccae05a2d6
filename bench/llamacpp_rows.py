"""The llamacpp rows of ``bench/decode_bench.py --llamacpp f16,q8_0``, and batch inference on
both backends (``--batch N``): measured in the same process as the pt rows, on the same prompt.

decode rows: the model's GGUF export (made once, cached as ``infer --infer_backend llamacpp``
does) decodes exactly ``new`` greedy tokens from the same prompt ids as the pt rows, through
the backend's own loop (prefill, then per token: logits, ``pick_token``, ``Llama.eval``), the
KV cache emptied before every run so that ttft_s includes the whole prefill.

chat TTFT rows: how long a user waits for the first text of an answer, as ``tunesmith infer``
streams it: the engine loaded as infer loads it (llamacpp: primed with the template's shared
prompt start), then one chat question after another (the default system prompt, the chat
template, tokenizing, prefill, first token, its text): the first answer after load, and the
median of the next ones (each a new question, so only the shared start is reused).

batch rows: ``N`` chat questions answered greedily (at most ``new`` tokens each) by
``tunesmith infer --val_dataset``'s code: the pt engine's left-padded batches of 8
(``batch.answer_all``) and the llamacpp engine's one-at-a-time ``generate_many``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

QUESTIONS = [
    "你是谁?", "Who are you?", "用一句话解释什么是机器学习。", "What is 2+2?",
    "Write a Python function that reverses a string.", "Name three primary colors.",
    "What is the capital of France?", "Give me a synonym for 'happy'.",
]  # fmt: skip


def export(model: str, gguf_type: str) -> Any:
    """The cached GGUF file of ``model`` (a directory or 'demo') in ``gguf_type``."""
    from tunesmith.cli import parse_args
    from tunesmith.config import InferCommandArgs
    from tunesmith.model.gguf_cache import cached_gguf

    argv = ["--model", model, "--gguf_type", gguf_type]
    return cached_gguf(parse_args(InferCommandArgs, "infer", "", argv))[0]


def decode_once(engine: Any, ids: list[int], new: int) -> tuple[float, float, list[int]]:
    """(ttft_s, decode tokens/s, ids) of ``new`` greedy tokens after a cold prefill."""
    import llama_cpp

    from tunesmith.infer.llamacpp_backend import Sampling, _prefill, pick_token

    llm, s = engine.llm, Sampling(False, 1.0, 0, 1.0, 1.0)
    seen = np.zeros(llm.n_vocab(), dtype=bool)
    llm.n_tokens = 0  # cold: the whole prompt is evaluated
    out, stamps = [], []
    start = time.perf_counter()
    _prefill(llm, ids)
    for _ in range(new):
        ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        logits = np.ctypeslib.as_array(ptr, shape=(seen.size,)).copy()
        out.append(pick_token(logits, seen, s, engine.rng))
        stamps.append(time.perf_counter())
        llm.eval([out[-1]])
    return stamps[0] - start, (new - 1) / (stamps[-1] - stamps[0]), out


def decode_rows(
    model: str, types: list[str], ids: list[int], new: int, warmup: int, repeat: int,
    report: Callable[[str, float, float, list[int], dict[str, Any]], None],
) -> None:  # fmt: skip
    """One ``report(variant, tokens/s, ttft_s, ids, extra)`` per GGUF type."""
    import statistics

    from tunesmith.infer.llamacpp_backend import load_gguf

    for t in types:
        path = export(model, t)
        engine = load_gguf(path)
        for _ in range(warmup):
            decode_once(engine, ids, new)
        runs = [decode_once(engine, ids, new) for _ in range(repeat)]
        tps = statistics.median(r[1] for r in runs)
        ttft = statistics.median(r[0] for r in runs)
        extra = {"gguf_gb": round(path.stat().st_size / 1e9, 3), "threads": engine.llm.n_threads}
        report(f"llamacpp_{t}", tps, ttft, runs[-1][2], extra)
        del engine


class FirstText:
    """A text sink (``stream_to``) that notes when the first piece arrives."""

    def __init__(self) -> None:
        self.at: float | None = None

    def write(self, text: str) -> None:
        """Note the time of the first non-empty piece."""
        if text and self.at is None:
            self.at = time.perf_counter()

    def flush(self) -> None:
        """Nothing to flush."""


def chat_ttft_rows(model: str, model_dir: Any, types: list[str], dtype: Any, new: int) -> list:
    """Time to the first text of chat answers, pt (its default decode path) then llamacpp."""
    import statistics

    import torch
    from transformers import AutoModelForCausalLM

    from tunesmith.infer.engine import Engine, chat_messages, generate
    from tunesmith.infer.llamacpp_backend import GenOptions, load_gguf
    from tunesmith.model.load import load_tokenizer

    convs = [chat_messages(None, [], q) for q in QUESTIONS]

    def row(variant: str, load_s: float, first: Any) -> dict:
        times = []
        for messages in convs:
            start = time.perf_counter()
            at = first(messages)
            times.append(at - start)
        return {"variant": variant, "load_s": round(load_s, 2), "chat_ttft_first_s":
                round(times[0], 4), "chat_ttft_median_s": round(statistics.median(times[1:]), 4),
                "chat_ttft_max_s": round(max(times[1:]), 4), "questions": len(convs)}  # fmt: skip

    start = time.perf_counter()
    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    tok = load_tokenizer(model_dir)
    pt = Engine(m, tok, None, torch.device("cpu"))
    kw = {"max_new_tokens": 2, "do_sample": False, "pad_token_id": tok.pad_token_id}

    def pt_first(messages: list, pt: Any = pt) -> float:
        sink = FirstText()
        generate(pt, messages, kw, stream_to=sink)
        return sink.at or time.perf_counter()

    rows = [row("pt_chat", time.perf_counter() - start, pt_first)]
    del pt, m
    gen = GenOptions(max_new_tokens=2, temperature=0)
    for t in types:
        start = time.perf_counter()
        engine = load_gguf(export(model, t))

        def first(messages: list, engine: Any = engine) -> float:
            for _piece in engine.stream(messages, gen):
                return time.perf_counter()
            return time.perf_counter()

        rows.append(row(f"llamacpp_{t}_chat", time.perf_counter() - start, first))
        del engine
    return rows


def batch_rows(
    model: str, model_dir: Any, types: list[str], n: int, new: int, dtype: Any = None
) -> list[dict]:
    """Records/s and answer tokens/s of batch inference over ``n`` questions, pt then llamacpp."""
    import torch
    from transformers import AutoModelForCausalLM

    from tunesmith.infer.batch import answer_all
    from tunesmith.infer.engine import Engine
    from tunesmith.infer.llamacpp_backend import GenOptions, load_gguf
    from tunesmith.infer.llamacpp_batch import answer_batch
    from tunesmith.model.load import load_tokenizer, resolve_dtype

    convs = [[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}] for i in range(n)]
    tok = load_tokenizer(model_dir)
    dtype = dtype or resolve_dtype("auto", "cpu")  # the pt rows' dtype (--dtype)
    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    pt = Engine(m, tok, None, torch.device("cpu"))
    kw = {"max_new_tokens": new, "do_sample": False, "pad_token_id": tok.pad_token_id}
    rows = []

    def row(variant: str, answers: list[str], took: float, **extra: Any) -> dict:
        tokens = sum(len(tok(a, add_special_tokens=False)["input_ids"]) for a in answers)
        return {"variant": variant, "records": n, "max_new_tokens": new,
                "records_per_s": round(n / took, 3), "answer_tokens_per_s": round(tokens / took, 2),
                "seconds": round(took, 2), **extra}  # fmt: skip

    start = time.perf_counter()
    pt_answers = answer_all(pt, convs, kw, batch_size=8, progress=False)
    rows.append(row("pt_batch8", pt_answers, time.perf_counter() - start,
                    dtype=str(dtype).removeprefix("torch.")))  # fmt: skip
    del pt, m
    for t in types:
        engine = load_gguf(export(model, t))
        gen = GenOptions(max_new_tokens=new, temperature=0)
        start = time.perf_counter()  # one record at a time (infer's path before parallel)
        seq = engine.generate_many(convs, gen, progress=False)
        same = sum(a == b for a, b in zip(seq, pt_answers, strict=True))
        rows.append(row(f"llamacpp_{t}", seq, time.perf_counter() - start,
                        same_answers_as_pt=f"{same}/{n}"))  # fmt: skip
        start = time.perf_counter()  # infer --val_dataset's path now: 16 sequences together
        par = answer_batch(engine, convs, gen, progress=False)
        same = sum(a == b for a, b in zip(par, seq, strict=True))
        rows.append(row(f"llamacpp_{t}_parallel", par, time.perf_counter() - start,
                        same_answers_as_sequential=f"{same}/{n}"))  # fmt: skip
    base = rows[0]["records_per_s"]
    for r in rows:
        r["ratio_vs_pt"] = round(r["records_per_s"] / base, 2)
    return rows
