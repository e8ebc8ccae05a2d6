"""Time to first token of ``tunesmith infer`` on CPU: the demo model, a 30-token prompt.

Loads the engine exactly as ``tunesmith infer --model demo`` does (default dtype and decode
path), then times, for the first call after load and for five more, how long the first new
token takes to reach the streamer (tokenizing, prefill, first sampled token).
Usage: python bench/ttft.py [--model demo] [--torch_dtype auto]
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from tunesmith.cli import parse_args
from tunesmith.config import InferCommandArgs
from tunesmith.infer.engine import (
    chat_messages,
    generate_tokens,
    generation_kwargs,
    load_engine,
)


class FirstToken:
    """A streamer that notes when the first generated token arrives (the prompt comes first)."""

    def __init__(self) -> None:
        self.calls, self.at = 0, None

    def put(self, _value) -> None:
        """transformers' streamer interface: called with the prompt, then with new tokens."""
        self.calls += 1
        if self.calls == 2 and self.at is None:
            self.at = time.perf_counter()

    def end(self) -> None:
        """transformers' streamer interface."""


def main() -> None:
    """Load, then time the first token of six answers; print the figures."""
    t = time.perf_counter()
    args = parse_args(
        InferCommandArgs,
        "infer",
        "",
        ["--model", "demo", "--temperature", "0", "--max_new_tokens", "2", *sys.argv[1:]],
    )
    engine = load_engine(args)
    load_s = time.perf_counter() - t
    gen = generation_kwargs(args, engine.tokenizer)
    tok = engine.tokenizer
    # A ~30-token prompt in all (chat template and the seeds' short system prompt included).
    query = "Why does the sky look blue during the day?"
    msgs = chat_messages("You are a helpful assistant.", [], query)
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    times = []
    for _ in range(6):
        s = FirstToken()
        t = time.perf_counter()
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        enc = tok(text, return_tensors="pt", add_special_tokens=False).to(engine.device)
        generate_tokens(engine, enc["input_ids"], enc["attention_mask"], gen, s)
        times.append((s.at or time.perf_counter()) - t)
    print(
        f"load {load_s:.1f} s; prompt {ids.shape[-1]} tokens; time to first token: first call "
        f"{times[0]:.3f} s, then median {statistics.median(times[1:]):.3f} s "
        f"(min {min(times[1:]):.3f}); dtype {next(engine.model.parameters()).dtype}, "
        f"fast decode {engine.fast}"
    )


if __name__ == "__main__":
    main()
