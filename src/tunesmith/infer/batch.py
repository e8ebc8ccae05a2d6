"""Batch inference: answer every record of ``--val_dataset`` and write a JSON Lines result file.

Each record becomes a prompt (the conversation up to its last user turn) and, when the record
has a final assistant reply, a reference answer. Prompts are generated ``--max_batch_size`` at
a time, longest first (similar lengths share a batch, so little padding is computed, and an
out-of-memory error shows in the first batch, not the last); the result lines keep the order
of the input records. The shape of a line follows ms-swift's ``swift infer --val_dataset``:
``{"messages": [prompt turns], "response": answer, "labels": reference}``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunesmith.config import InferCommandArgs
from tunesmith.data.messages import Conversation
from tunesmith.data.sources import Loaded, load_spec, report_problems
from tunesmith.infer.engine import Engine, generate_batch
from tunesmith.model.adapters import check_adapter
from tunesmith.options import DataOptions
from tunesmith.utils import UserError, logger, write_jsonl


@dataclass
class Prompt:
    """One record to answer."""

    messages: list[dict[str, str]]
    """The record's turns up to and including the last user turn."""
    reference: str | None
    """The record's own final assistant reply, if it had one."""
    origin: str
    """``file:line`` of the record."""


def split_reference(conv: Conversation) -> Prompt:
    """The prompt (every turn but a final assistant reply) and that reply as the reference."""
    msgs = conv.as_dicts()
    reference = None
    if msgs and msgs[-1]["role"] == "assistant":
        reference = msgs.pop()["content"]
    return Prompt(msgs, reference, conv.origin)


def load_prompts(specs: list[str], use_hf: bool = True, seed: int = 42) -> list[Prompt]:
    """Every record of ``specs`` as a Prompt; all bad records are reported in one error."""
    opts = DataOptions(use_hf=use_hf, seed=seed, prompt_only=True)
    loaded = Loaded()
    convs = [c for spec in specs for c in load_spec(spec, opts, loaded)]
    report_problems(loaded.problems, strict=True)
    if not convs:
        raise UserError(f"--val_dataset {' '.join(specs)}: no records to answer")
    return [split_reference(c) for c in convs]


def default_result_path(args: InferCommandArgs) -> Path:
    """ms-swift's place for results: beside the checkpoint, else under ./infer_result/."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if args.adapters:
        return check_adapter(args.adapters[-1]) / "infer_result" / f"{stamp}.jsonl"
    return Path("infer_result") / f"{stamp}.jsonl"


def default_batch_size(engine: Engine) -> int:
    """16 on a GPU; 8 on a CPU, where a larger batch gains little and pads more."""
    return 16 if engine.device.type == "cuda" else 8


def with_system(messages: list[dict[str, str]], system: str | None) -> list[dict[str, str]]:
    """``messages`` with the default system prompt first, unless they have their own."""
    if system is None or (messages and messages[0]["role"] == "system"):
        return messages
    return [{"role": "system", "content": system}, *messages]


def answer_all(
    engine: Engine,
    conversations: list[list[dict[str, str]]],
    gen_kwargs: dict[str, Any],
    batch_size: int,
    progress: bool = True,
) -> list[str]:
    """The answers to ``conversations``, in their order, generated ``batch_size`` at a time."""
    from tqdm import tqdm

    # Rendered length in characters: a cheap stand-in for the token count when sorting.
    size = [len(engine.tokenizer.apply_chat_template(m, tokenize=False)) for m in conversations]
    order = sorted(range(len(conversations)), key=lambda i: -size[i])
    answers: list[str] = [""] * len(conversations)
    with tqdm(total=len(conversations), unit="rec", desc="infer", disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            out = generate_batch(engine, [conversations[i] for i in idx], gen_kwargs)
            for i, text in zip(idx, out, strict=True):
                answers[i] = text
            bar.update(len(idx))
    return answers


def infer_dataset(
    engine: Engine,
    args: InferCommandArgs,
    gen_kwargs: dict[str, Any],
    prompts: list[Prompt],
    progress: bool = True,
    answer_many: Callable[[list[list[dict[str, str]]]], list[str]] | None = None,
) -> Path:
    """Answer ``prompts`` (``load_prompts(--val_dataset)``) and write ``--result_path``.

    ``answer_many`` replaces the ``pt`` engine's batching (vLLM batches itself, llama.cpp
    decodes greedy answers ``--max_batch_size`` sequences together, others one at a time).
    """
    if answer_many is None:
        if args.max_batch_size is not None and args.max_batch_size < 1:
            raise UserError(f"--max_batch_size must be at least 1, got {args.max_batch_size}")
        batch = args.max_batch_size or default_batch_size(engine)
    path = Path(args.result_path).expanduser() if args.result_path else default_result_path(args)
    try:  # find out now, not after hours of generation, that the file cannot be written
        path.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(path.parent, os.W_OK):
            raise PermissionError(13, "permission denied")
    except OSError as e:
        raise UserError(f"--result_path {path}: cannot write there ({e.strerror or e})") from None
    how = f"by the {args.infer_backend} backend" if answer_many else f"{batch} at a time"
    logger.info(f"answering {len(prompts)} records, {how}; results go to {path}")
    start = time.perf_counter()
    convs = [with_system(p.messages, engine.system) for p in prompts]
    if answer_many is None:
        answers = answer_all(engine, convs, gen_kwargs, batch, progress)
    else:
        answers = answer_many(convs)
    rows = []
    for p, answer in zip(prompts, answers, strict=True):
        row: dict[str, Any] = {"messages": p.messages, "response": answer}
        if p.reference is not None:
            row["labels"] = p.reference
        rows.append(row)
    try:
        write_jsonl(path, rows)
    except OSError as e:
        raise UserError(f"--result_path {path}: cannot write ({e.strerror or e})") from None
    took = time.perf_counter() - start
    logger.info(f"wrote {len(rows)} answers to {path} ({took:.1f} s, {len(rows) / took:.2f} rec/s)")
    return path
