"""The batching scheduler alone: rows that join a running batch at different steps, with
different adapters, decode exactly what each would decode alone."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from tunesmith.serve.scheduler import Job, Sampling, Scheduler, partial_stop, pick


def run_jobs(model, tok, specs: list[tuple[list[int], str | None]], n: int, gap: float) -> list:
    sched = Scheduler(model, tok, set(), max_batch=8)
    sched.start()
    done = threading.Semaphore(0)
    jobs = []
    for ids, adapter in specs:
        job = Job(ids, adapter, n, Sampling(temperature=0), [], time.monotonic() + 60,
                  lambda kind, v: done.release() if kind != "text" else None)  # fmt: skip
        jobs.append(job)
        sched.submit(job)
        time.sleep(gap)  # later rows join a batch that is already decoding
    for _ in jobs:
        assert done.acquire(timeout=60)
    sched.stop()
    return [j.tokens for j in jobs]


def test_joining_rows_equal_generate_alone(isolated_torch, tiny_model_dir: Path,
                                           checkpoint: Path) -> None:  # fmt: skip
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    texts = ["hello there", "a much longer prompt about the things we like", "x", "def a(b):"]
    prompts = [tok(t)["input_ids"] for t in texts]

    def alone(model, ids):
        out = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                             eos_token_id=None)  # fmt: skip
        return out[0, len(ids) :].tolist()

    ref_base = [alone(base, p) for p in prompts]
    peft = PeftModel.from_pretrained(base, checkpoint, adapter_name="a0").eval()
    ref_lora = [alone(peft, p) for p in prompts]
    assert ref_base != ref_lora
    specs = [(p, "a0" if i % 2 else None) for i, p in enumerate(prompts)]
    got = run_jobs(peft, tok, specs, 12, gap=0.02)
    want = [ref_lora[i] if i % 2 else ref_base[i] for i in range(len(prompts))]
    assert got == want


def test_pick_filters() -> None:
    row = torch.tensor([0.0, 5.0, 4.0, -1.0])
    assert pick(row, Sampling(temperature=0), [], None) == 1
    # Repetition penalty on token 1 (seen) makes token 2 the greedy choice.
    assert pick(row, Sampling(temperature=0, repetition_penalty=2.0), [1], None) == 2
    g = torch.Generator().manual_seed(0)
    draws = {pick(row, Sampling(temperature=1.0, top_k=2), [], g) for _ in range(200)}
    assert draws == {1, 2}
    draws = {pick(row, Sampling(temperature=1.0, top_p=0.5), [], g) for _ in range(50)}
    assert draws == {1}


@pytest.mark.parametrize(
    ("text", "stops", "held"),
    [("hello wor", ["world"], 3), ("hello", ["xyz"], 0), ("ab", ["abc", "b"], 2)],
)
def test_partial_stop_is_held_back(text: str, stops: list[str], held: int) -> None:
    assert partial_stop(text, stops) == held
