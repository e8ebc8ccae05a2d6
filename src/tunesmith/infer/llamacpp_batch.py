"""Many answers at once on llama.cpp: several sequences decoded together in one context.

:class:`~tunesmith.infer.llamacpp_backend.LlamaCppEngine` answers one conversation at a time.
A decode step of several sequences reads the weights once for all of them, so a list of
questions, as ``tunesmith eval`` asks, is answered faster when the sequences share the steps
(the demo model on 2 cores: 64 questions in 24.5 s instead of 43.1 s, bench/RESULTS.md); past
that the CPU's arithmetic is the limit, so what remains to save is tokens: the prompts' common
start (chat template, system prompt) is evaluated once and shared by every sequence.

This opens a second llama.cpp context on the engine's loaded weights with room for
``parallel`` sequences (one KV cache, shared) and keeps every slot busy: when an answer ends,
the next conversation's prompt is evaluated in the same step as the other slots' next tokens.
Prompts are rendered and tokens picked by the engine's own functions (chat template, the
model's generation config, the repetition penalty over prompt and answer), so the answers are
the engine's; greedy answers can differ from one-at-a-time ones only where the two best tokens
are within the rounding of a differently ordered sum.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tunesmith.infer.llamacpp_backend import (
    GenOptions,
    LlamaCppEngine,
    cpu_threads,
    import_llama_cpp,
    pick_token,
    render_prompt,
    resolve_sampling,
)
from tunesmith.utils import UserError, logger

DEFAULT_PARALLEL = 16
"""Sequences decoded together (on 2 CPU cores 32 was hardly faster than 16 for the demo model)."""


@dataclass
class _Slot:
    """One sequence of the shared context while it answers one conversation."""

    index: int
    """Which conversation (its place in the input list)."""
    pending: list[int]
    """Tokens still to evaluate: the prompt at first, then the last picked token."""
    pos: int = 0
    """Position of the first pending token in the sequence."""
    seen: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    """Token ids in the sequence so far (the repetition penalty reads them)."""
    out: list[int] = field(default_factory=list)
    """The answer's token ids."""
    logit_row: int = -1
    """Row of this slot's logits in the last decoded batch."""


def _context(engine: LlamaCppEngine, n_ctx: int, parallel: int, n_batch: int) -> object:
    """A new llama.cpp context on the engine's weights: one KV cache of ``n_ctx`` cells shared
    by up to ``parallel`` sequences."""
    llama_cpp = import_llama_cpp()
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = n_ctx
    params.n_batch = n_batch
    params.n_ubatch = min(n_batch, 512)
    params.n_seq_max = parallel
    params.kv_unified = True  # cells go where needed (answers differ in length), prefix shared
    params.n_threads = params.n_threads_batch = cpu_threads()
    ctx = llama_cpp.llama_init_from_model(engine.llm.model, params)
    if not ctx:
        raise UserError(f"llama.cpp could not create a context of {n_ctx} tokens for "
                        f"{parallel} sequences (out of memory?)")  # fmt: skip
    return ctx


def shared_prefix(prompts: list[list[int]]) -> int:
    """Length of the token prefix all prompts share (the chat template's start and the system
    prompt), short of the shortest prompt: its last token must be evaluated per sequence."""
    first, n = prompts[0], min(map(len, prompts)) - 1
    for p in prompts[1:]:
        n = next((k for k in range(n) if p[k] != first[k]), n)
    return max(n, 0)


def _decode(llama_cpp: Any, ctx: Any, batch: Any, parts: list[tuple[int, list[int], int, bool]]
            ) -> list[int]:  # fmt: skip
    """Evaluate ``(sequence, tokens, first position, logits wanted)`` parts in one batch; the
    batch row of each part's last token (its logits, when wanted)."""
    n, rows = 0, []
    for seq, tokens, pos, wanted in parts:
        for k, tok in enumerate(tokens):
            batch.token[n], batch.pos[n] = tok, pos + k
            batch.n_seq_id[n], batch.seq_id[n][0] = 1, seq
            batch.logits[n] = wanted and k == len(tokens) - 1
            n += 1
        rows.append(n - 1)
    batch.n_tokens = n
    rc = llama_cpp.llama_decode(ctx, batch)
    if rc != 0:
        raise RuntimeError(f"llama_decode failed ({rc}) on a batch of {n} tokens")
    return rows


def _sizes(engine: LlamaCppEngine, prompts: list[list[int]], gen: GenOptions, parallel: int,
           shared: int) -> tuple[int, int, int]:  # fmt: skip
    """Room per sequence, context size (one KV cache for all sequences and the shared
    prefix, rounded up to 256 cells) and batch size for :func:`generate_parallel`."""
    longest = max(map(len, prompts))
    if longest + 1 > engine.n_ctx:
        raise UserError(f"a conversation is {longest} tokens, more than the context "
                        f"({engine.n_ctx}) leaves room for; raise --max_model_len")  # fmt: skip
    per_seq = min(longest + gen.max_new_tokens, engine.n_ctx)
    n_ctx = -(-(parallel * per_seq + shared) // 256) * 256
    return per_seq, n_ctx, max(512, parallel * longest)


def generate_parallel(
    engine: LlamaCppEngine,
    conversations: list[list[dict[str, str]]],
    gen: GenOptions,
    parallel: int = DEFAULT_PARALLEL,
    on_done: Callable[[int, str], None] | None = None,
) -> list[str]:
    """Answers to ``conversations`` in their order, ``parallel`` sequences decoded together.

    ``on_done(index, answer)``, when given, is called as each answer completes (for caching
    and progress bars). Stop strings are not supported here (eval does not use them).
    """
    llama_cpp = import_llama_cpp()
    if gen.stop:
        raise ValueError("generate_parallel does not support stop strings")
    prompts = [render_prompt(engine, c) for c in conversations]
    if not prompts:
        return []
    parallel = max(1, min(parallel, len(prompts)))
    shared = shared_prefix(prompts)
    per_seq, n_ctx, n_batch = _sizes(engine, prompts, gen, parallel, shared)
    s = resolve_sampling(gen, engine.defaults)
    rng = engine.rng if gen.seed is None else np.random.default_rng(gen.seed)
    llm = engine.llm
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    n_vocab = llm.n_vocab()
    answers: list[str | None] = [None] * len(prompts)
    ctx = _context(engine, n_ctx, parallel + 1, n_batch)  # + the shared prefix's sequence
    batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
    try:
        mem = llama_cpp.llama_get_memory(ctx)
        queue = list(range(len(prompts)))
        queue.sort(key=lambda i: -len(prompts[i]))  # long prompts first: less tail waiting
        slots: list[_Slot | None] = [None] * parallel
        if shared:  # evaluated once, in a sequence of its own that every slot starts from
            _decode(llama_cpp, ctx, batch, [(parallel, prompts[0][:shared], 0, False)])

        def start(seq: int) -> None:
            i = queue.pop(0)
            seen = np.zeros(n_vocab, dtype=bool)
            seen[prompts[i]] = True
            llama_cpp.llama_memory_seq_rm(mem, seq, -1, -1)
            if shared:  # with one KV cache for all, sharing the prefix's cells copies nothing
                llama_cpp.llama_memory_seq_cp(mem, parallel, seq, 0, shared)
            slots[seq] = _Slot(i, prompts[i][shared:], shared, seen)

        def finish(seq: int, slot: _Slot) -> None:
            text = llm.detokenize(slot.out, special=False).decode("utf-8", "replace")
            answers[slot.index] = text
            if on_done is not None:
                on_done(slot.index, text)
            slots[seq] = None

        while queue or any(slots):
            for seq in range(parallel):
                if slots[seq] is None and queue:
                    start(seq)
            live = [(seq, slot) for seq, slot in enumerate(slots) if slot is not None]
            rows = _decode(llama_cpp, ctx, batch, [(q, sl.pending, sl.pos, True) for q, sl in live])
            for (_seq, live_slot), row in zip(live, rows, strict=True):
                live_slot.logit_row, live_slot.pos = row, live_slot.pos + len(live_slot.pending)
            for seq, slot in enumerate(slots):
                if slot is None:
                    continue
                ptr = llama_cpp.llama_get_logits_ith(ctx, slot.logit_row)
                logits = np.ctypeslib.as_array(ptr, shape=(n_vocab,)).copy()
                token = pick_token(logits, slot.seen, s, rng)
                if llama_cpp.llama_vocab_is_eog(vocab, token):
                    finish(seq, slot)
                    continue
                slot.out.append(token)
                slot.seen[token] = True
                slot.pending = [token]
                room = per_seq - slot.pos
                if len(slot.out) >= gen.max_new_tokens or room <= 0:
                    finish(seq, slot)
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
    return [a or "" for a in answers]


def sequential_reason(engine: LlamaCppEngine, gen: GenOptions) -> str | None:
    """Why ``gen`` is answered one record at a time rather than by :func:`generate_parallel`;
    None when the parallel answers are the sequential ones (greedy, no stop strings)."""
    if gen.stop:
        return "stop strings"  # generate_parallel does not cut answers at them
    if resolve_sampling(gen, engine.defaults).do_sample:
        # generate_parallel can sample, but the sequences draw from one random stream in
        # step order, so a seeded run's answers would change with the batch size and differ
        # from the one-at-a-time answers: keep those reproducible.
        return "sampling"
    return None


def answer_batch(
    engine: LlamaCppEngine,
    conversations: list[list[dict[str, str]]],
    gen: GenOptions,
    parallel: int | None = None,
    progress: bool = True,
) -> list[str]:
    """Answers to ``conversations`` in their order (``infer --val_dataset``): greedy requests
    ``parallel`` sequences at a time (default :data:`DEFAULT_PARALLEL`), others one at a time."""
    from tqdm import tqdm

    if parallel is not None and parallel < 1:
        raise UserError(f"--max_batch_size must be at least 1, got {parallel}")
    if why := sequential_reason(engine, gen):
        logger.info(f"llama.cpp answers one record at a time (for {why})")
        return engine.generate_many(conversations, gen, progress)
    parallel = parallel or DEFAULT_PARALLEL
    logger.info(f"llama.cpp decodes {min(parallel, len(conversations))} answers together")
    with tqdm(total=len(conversations), unit="rec", desc="infer", disable=not progress) as bar:
        return generate_parallel(engine, conversations, gen, parallel,
                                 on_done=lambda _i, _a: bar.update(1))  # fmt: skip
