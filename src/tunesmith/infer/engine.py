"""The ``pt`` inference engine: load base + adapters from a checkpoint alone, and generate."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TextIO

import torch

from tunesmith.config import InferCommandArgs
from tunesmith.infer.decode import CACHE_BUCKET
from tunesmith.model.adapters import load_adapted, resolve_base
from tunesmith.model.load import resolve_dtype
from tunesmith.options import model_options
from tunesmith.utils import logger


@dataclass
class Engine:
    """A loaded model ready to answer chat messages."""

    model: Any
    """The causal LM (with adapters applied)."""
    tokenizer: Any
    """Its tokenizer, with the chat template."""
    system: str | None
    """Default system prompt (the training run's, unless overridden)."""
    device: torch.device
    """Where the model runs."""
    fast: bool = False
    """Decode with a static KV cache (and, on CUDA, a torch.compile'd decode step)."""


def load_engine(args: InferCommandArgs) -> Engine:
    """Load the model for ``infer``: ``--model``, or the base recorded with ``--adapters``."""
    base = resolve_base(model_options(args), args.adapters, args.system)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_dtype(args.torch_dtype, device.type)
    # A QLoRA adapter meets its base quantized as in training; a merge needs full precision.
    model, tokenizer = load_adapted(base, dtype, device, args.attn_impl, not args.merge_lora)
    fast = args.fast_decode if args.fast_decode is not None else device.type == "cuda"
    if fast:
        how = "torch.compile'd decode step" if device.type == "cuda" else "no compile on CPU"
        logger.info(f"fast decoding: static KV cache, {how}")
    return Engine(model, tokenizer, base.system, device, fast)


def generation_kwargs(args: InferCommandArgs, tokenizer: Any) -> dict[str, Any]:
    """``generate`` arguments; unset sampling flags keep the model's generation config."""
    kw: dict[str, Any] = {
        "max_new_tokens": args.max_new_tokens,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if args.temperature is not None:
        if args.temperature <= 0:
            kw |= {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        else:
            kw |= {"do_sample": True, "temperature": args.temperature}
    if args.top_p is not None:
        kw["top_p"] = args.top_p
    if args.top_k is not None:
        kw["top_k"] = args.top_k
    if args.repetition_penalty is not None:
        kw["repetition_penalty"] = args.repetition_penalty
    return kw


def decode_kwargs(engine: Engine, prompt_len: int, max_new_tokens: int) -> dict[str, Any]:
    """Extra ``generate`` arguments of the fast path (none on the default path).

    Only for what the fast path leaves to ``generate``: batches and options the hand-written
    loop of :mod:`tunesmith.infer.decode` does not do (see ``generate_tokens``).
    The static cache is sized up to a multiple of ``CACHE_BUCKET`` tokens and only ever grows
    (transformers reuses it while it fits), so the compiled decode step (CUDA graphs on a fixed
    cache shape) is recompiled a handful of times, not on every new prompt length.
    On CUDA, transformers compiles the decode step itself when the cache is static; on CPU the
    compile is switched off: batch-1 decoding there is already near the memory-bandwidth
    bound, and a compiled step measured 0.96x the uncompiled one (bench/RESULTS.md).
    """
    if not engine.fast:
        return {}
    need = prompt_len + max_new_tokens
    return {
        "cache_implementation": "static",
        "max_cache_len": -(-need // CACHE_BUCKET) * CACHE_BUCKET,
        "disable_compile": engine.device.type != "cuda",
    }


def chat_messages(
    system: str | None, history: list[dict[str, str]], query: str
) -> list[dict[str, str]]:
    """The message list for one turn: system prompt, earlier turns, the new query."""
    msgs = [{"role": "system", "content": system}] if system is not None else []
    return [*msgs, *history, {"role": "user", "content": query}]


def text_streamer(tokenizer: Any, out: TextIO) -> Any:
    """A transformers streamer that writes decoded text to ``out`` as it arrives."""
    from transformers import TextStreamer

    class Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            out.write(text)
            out.flush()

    return Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


@torch.inference_mode()
def generate(
    engine: Engine,
    messages: list[dict[str, str]],
    gen_kwargs: dict[str, Any],
    stream_to: TextIO | None = None,
) -> str:
    """Answer ``messages``; with ``stream_to``, tokens are written there as they are made."""
    tok = engine.tokenizer
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = tok(text, return_tensors="pt", add_special_tokens=False).to(engine.device)
    streamer = text_streamer(tok, stream_to) if stream_to is not None else None
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    new = generate_tokens(engine, ids, mask, gen_kwargs, streamer)
    answer = tok.decode(new[0], skip_special_tokens=True)
    if stream_to is not None and not answer.endswith("\n"):
        stream_to.write("\n")
    return answer


@torch.inference_mode()
def generate_batch(
    engine: Engine, conversations: list[list[dict[str, str]]], gen_kwargs: dict[str, Any]
) -> list[str]:
    """Answer several conversations in one ``generate`` call.

    Prompts are padded on the left, so every row's next token is at the last position; the
    attention mask hides the padding, and ``generate`` derives the position ids from it, so
    each row gets the same greedy answer as when generated alone.
    """
    tok = engine.tokenizer
    texts = [
        tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
        for m in conversations
    ]
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    width = max(map(len, ids))
    pad = tok.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in ids], device=engine.device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in ids], device=engine.device)
    new = generate_tokens(engine, input_ids, mask, gen_kwargs)
    return tok.batch_decode(new, skip_special_tokens=True)


@torch.inference_mode()
def generate_tokens(
    engine: Engine,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    gen_kwargs: dict[str, Any],
    streamer: Any = None,
) -> torch.Tensor:
    """The new token ids for a (left-padded) batch of prompts, on the engine's decode path.

    On the fast path, one unpadded prompt with options :func:`decode.decode_plan` accepts
    (greedy or temperature/top-k/top-p sampling, repetition penalty) goes through the
    hand-written decode loop; anything else through ``generate`` with a static cache.
    ``gen_kwargs`` win over the fast path's own arguments (the decode benchmark passes
    ``disable_compile`` to try ``generate``'s compiled decode step on CPU, which keeps that
    request on ``generate``).
    """
    width = input_ids.shape[1]
    if engine.fast and "disable_compile" not in gen_kwargs:
        from tunesmith.infer.decode import decode_plan, fast_generate

        plan = decode_plan(engine.model, gen_kwargs)
        # The hand-written loop does batch 1 without padding; the rest goes to generate.
        if plan is not None and input_ids.shape[0] == 1 and bool(attention_mask.all()):
            return fast_generate(engine.model, input_ids, plan, streamer)
    kw = decode_kwargs(engine, width, gen_kwargs["max_new_tokens"]) | gen_kwargs
    out = engine.model.generate(
        input_ids=input_ids, attention_mask=attention_mask, **kw, streamer=streamer
    )
    return out[:, width:]
