"""A hand-written batch-1 decode loop for the fast path (gpt-fast style).

``model.generate`` spends most of a batch-1 decode step on the host: logits processors,
stopping criteria that read a flag back from the device every step, cache bookkeeping and
Python between compiled graphs. Here a step is one function, forward + token choice, that
on CUDA is compiled once per model with CUDA graphs (``mode="reduce-overhead"``); the new
token stays on the device, and the host only looks at it every ``EOS_CHECK_EVERY`` steps
(or every step when streaming, since the streamer needs the token anyway).

Only what can be done exactly is handled: batch 1 without padding, greedy or plain
temperature / top-k / top-p sampling, ``repetition_penalty``, ``min_new_tokens``. Anything
else (beams, stop strings, no-repeat n-grams, ...) makes :func:`decode_plan` return None,
and the caller falls back to ``model.generate``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

CACHE_BUCKET = 256
"""Static caches are sized to a multiple of this many tokens, so prompts of other lengths
reuse the same cache (and the same compiled step)."""

EOS_CHECK_EVERY = 16
"""Steps between host reads of the generated tokens when not streaming: each read waits
for the device; tokens made after an EOS are computed, then dropped."""

# ``generate`` arguments the loop understands; any other one means "fall back".
_KNOWN = {
    "max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_k", "top_p",
    "pad_token_id", "eos_token_id", "repetition_penalty",
}  # fmt: skip

# Generation-config fields that change the output unless at these (neutral) values.
_NEUTRAL: dict[str, Any] = {
    "num_beams": 1, "num_return_sequences": 1,
    "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "min_length": 0,
    "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "min_p": None,
    "bad_words_ids": None, "sequence_bias": None, "suppress_tokens": None,
    "begin_suppress_tokens": None, "forced_bos_token_id": None, "forced_eos_token_id": None,
    "exponential_decay_length_penalty": None, "stop_strings": None, "guidance_scale": None,
    "renormalize_logits": False, "penalty_alpha": None, "assistant_model": None,
    "prompt_lookup_num_tokens": None, "watermarking_config": None,
}  # fmt: skip


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen (hashable: one compiled step per distinct value)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    """0: no top-k filter."""
    top_p: float = 1.0
    """1.0: no nucleus filter."""
    repetition_penalty: float = 1.0
    """1.0: none; else transformers' (prompt and answer tokens, greedy decoding too)."""


@dataclass
class Plan:
    """A request the loop can run exactly."""

    sampling: Sampling
    max_new_tokens: int
    min_new_tokens: int
    eos_ids: tuple[int, ...]


def decode_plan(model: Any, gen_kwargs: dict[str, Any]) -> Plan | None:
    """The loop's plan for ``gen_kwargs`` on top of the model's generation config, or None
    when ``model.generate`` must run it (an argument or config field the loop does not do)."""
    if set(gen_kwargs) - _KNOWN or core_model(model) is None:
        return None
    cfg = getattr(model, "generation_config", None)

    def get(name: str, default: Any = None) -> Any:
        if name in gen_kwargs:
            return gen_kwargs[name]
        return getattr(cfg, name, default) if cfg is not None else default

    for name, neutral in _NEUTRAL.items():
        value = get(name, neutral)
        if value is not None and value != neutral:
            return None
    rp = get("repetition_penalty")
    rp = 1.0 if rp is None else float(rp)
    if rp <= 0:
        return None  # generate refuses it; let it say so
    eos = get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
    do_sample = bool(get("do_sample", False))
    sampling = Sampling(repetition_penalty=rp)
    if do_sample:
        # The same "unset means off" rules as transformers' logits warpers.
        t, k, p = get("temperature"), get("top_k"), get("top_p")
        sampling = Sampling(
            do_sample=True,
            temperature=1.0 if t is None else float(t),
            top_k=0 if k is None else int(k),
            top_p=1.0 if p is None else float(p),
            repetition_penalty=rp,
        )
        if sampling.temperature <= 0:
            return None  # generate refuses it; let it say so
    return Plan(
        sampling, int(gen_kwargs["max_new_tokens"]), int(get("min_new_tokens") or 0), eos_ids
    )


def choose(logits: torch.Tensor, s: Sampling, seen: torch.Tensor) -> torch.Tensor:
    """Next token ids [B, 1] from last-position logits [B, V], on the device.

    ``seen`` [B, V] marks the tokens so far (prompt and answer), for the repetition
    penalty, applied as transformers does (negative logits times it, others divided by it)
    in float32. Sampling follows transformers' warpers in their order (temperature, top-k,
    top-p), then draws with the exponential trick (argmax of p / Exp(1)), which is a
    categorical draw without ``multinomial``'s host-side checks and compiles into CUDA graphs.
    """
    logits = logits.float()  # generate processes float32 logits too
    if s.repetition_penalty != 1.0:
        p = s.repetition_penalty
        penalized = torch.where(logits < 0, logits * p, logits / p)
        logits = torch.where(seen, penalized, logits)
    if not s.do_sample:
        return logits.argmax(dim=-1, keepdim=True)
    if s.temperature != 1.0:
        logits = logits / s.temperature
    if s.top_k > 0:
        k = min(s.top_k, logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=False, dim=-1)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cum <= (1 - s.top_p)
        remove[..., -1:] = False  # keep at least the most likely token
        logits = logits.masked_fill(remove.scatter(-1, idx, remove), float("-inf"))
    probs = logits.softmax(dim=-1)
    q = torch.empty_like(probs).exponential_(1)
    return (probs / q).argmax(dim=-1, keepdim=True)


def core_model(model: Any) -> Any:
    """The module whose forward the step calls: a peft LoRA wrapper's base model (the LoRA
    layers are inside it, so unmerged adapters still apply); the model itself otherwise.

    Calling the base model skips PeftModel.forward's Python (hooks, context managers) that
    would break the compiled graph and does nothing for LoRA.
    """
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return model
    if isinstance(model, PeftModel):
        if model.active_peft_config.is_prompt_learning:
            return None  # prompt tuning changes the inputs: only PeftModel.forward does that
        return model.get_base_model()
    return model


def decode_step(
    model: Any, token: torch.Tensor, position: torch.Tensor, cache: Any, bias: torch.Tensor,
    seen: torch.Tensor, sampling: Sampling, cache_arg: str = "past_key_values",
) -> torch.Tensor:  # fmt: skip
    """One decode step: feed ``token`` [B, 1] at ``position`` [B, 1], return the next token.

    The cache writes at its own (device-side) length; ``position`` only drives the rotary
    embedding and the causal mask, and is a tensor so the compiled step does not
    specialise on it. ``bias`` [1, V] is added to the logits (-inf on EOS ids while
    ``min_new_tokens`` is not reached, else zeros). ``seen`` [B, V] (a static address, as
    the cache's tensors: the step updates it in place) gets ``token`` marked, when there
    is a repetition penalty.
    """
    if sampling.repetition_penalty != 1.0:
        seen.scatter_(1, token, True)
    kw = {cache_arg: cache}
    out = model(input_ids=token, position_ids=position, use_cache=True, **kw)
    return choose(out.logits[:, -1, :] + bias, sampling, seen)


@dataclass
class _State:
    """Per-model reusable pieces: the static cache and the compiled steps."""

    cache_arg: str
    """The forward's name for the cache argument (see :func:`cache_arg`)."""
    modules: int
    """Fingerprint of the module tree the steps were compiled for."""
    cache: Any = None
    cache_len: int = 0
    steps: dict | None = None
    seen: torch.Tensor | None = None
    """[1, V] bool: the tokens so far, for the repetition penalty."""


_STATE_ATTR = "_tunesmith_decode_state"


def _state(model: Any) -> _State:
    # Stored on the model object, so it lives and dies with it (no global registry). A peft
    # wrapper's base model is the very object it wrapped, with LoRA layers swapped in (and
    # swapped out again by merge_and_unload): a changed module tree starts afresh, so no
    # step compiled for another tree is ever replayed.
    modules = hash(tuple(map(id, model.modules())))
    st = model.__dict__.get(_STATE_ATTR)
    if st is None or st.modules != modules:
        st = _State(cache_arg(model), modules, steps={})
        model.__dict__[_STATE_ATTR] = st
    return st


def cache_arg(model: Any) -> str:
    """``past_key_values`` (transformers 5.17), or ``cache`` where the forward takes that
    (newer ones, which warn on every call with the old name)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_for(model: Any, st: _State, need: int) -> Any:
    """A StaticCache with room for ``need`` tokens, reused (reset) while it fits; a bigger
    one replaces it (sized up to the bucket), so there are few distinct cache shapes."""
    from transformers import StaticCache

    if st.cache is None or st.cache_len < need:
        st.cache_len = -(-need // CACHE_BUCKET) * CACHE_BUCKET
        # (config, max_cache_len): the signature of transformers 5.17 and of the installed one.
        st.cache = StaticCache(model.config, max_cache_len=st.cache_len)
    else:
        st.cache.reset()
    return st.cache


def _step_fn(st: _State, sampling: Sampling, compile_step: bool, backend: str) -> Any:
    key = (sampling, compile_step, backend)
    if key not in st.steps:
        name = st.cache_arg

        def step(m, token, position, cache, bias, seen):
            return decode_step(m, token, position, cache, bias, seen, sampling, name)

        if compile_step:
            # fullgraph: a graph break would silently cost the speed this exists for;
            # dynamic=False: a bigger cache bucket gets its own static graph rather than
            # a dynamic-shape one.
            opts = {"mode": "reduce-overhead"} if backend == "inductor" else {}
            compiled = torch.compile(step, fullgraph=True, dynamic=False, backend=backend, **opts)
            step = _or_uncompiled(compiled, step, st, key)
        st.steps[key] = step
    return st.steps[key]


def _or_uncompiled(compiled: Any, eager: Any, st: _State, key: tuple) -> Any:
    """``compiled``, which on a tracing or compiler failure warns and is replaced by
    ``eager`` for good: a slower answer beats no answer. Such failures happen before the
    step runs (dynamo traces on fake tensors), so the cache is untouched and the eager
    retry is exact."""

    def step(*args: Any) -> torch.Tensor:
        try:
            return compiled(*args)
        except torch._dynamo.exc.TorchDynamoException as e:
            from tunesmith.utils import error_line, logger

            logger.warning(
                f"fast decoding: compiling the decode step failed ({type(e).__name__}: "
                f"{error_line(e)}); "
                "decoding uncompiled"
            )
            st.steps[key] = eager
            return eager(*args)

    return step


def _eos_bias(vocab: int, eos_ids: tuple[int, ...], device: torch.device) -> torch.Tensor:
    bias = torch.zeros(1, vocab, device=device)
    if eos_ids:
        # Ids outside the vocabulary cannot be made anyway (generate ignores them too).
        bias[0, [i for i in eos_ids if 0 <= i < vocab]] = float("-inf")
    return bias


def _to_host(x: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """Start copying ``x`` to the host; :func:`_wait` gives the copy once it has landed."""
    if x.device.type != "cuda":
        return x.clone(), None  # already there; cloned so later writes cannot change it
    host = x.to("cpu", non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    return host, done


def _wait(pending: tuple[torch.Tensor, Any]) -> torch.Tensor:
    host, done = pending
    if done is not None:
        done.synchronize()  # waits for the copy only, not for the step queued after it
    return host


def _first_eos(tokens: list[int], eos_ids: tuple[int, ...]) -> int | None:
    for i, t in enumerate(tokens):
        if t in eos_ids:
            return i
    return None


@torch.inference_mode()
def fast_generate(
    model: Any,
    input_ids: torch.Tensor,
    plan: Plan,
    streamer: Any = None,
    compile_step: bool | None = None,
    backend: str = "inductor",
) -> torch.Tensor:
    """New token ids [1, n] for a batch-1 unpadded prompt, as ``model.generate`` makes them
    (the EOS, when one is made, included and last).

    ``compile_step`` defaults to "on CUDA"; ``backend`` other than inductor is for tests
    (``"eager"`` checks that the step traces as one graph without needing a compiler).
    """
    core = core_model(model)
    device = input_ids.device
    if compile_step is None:
        compile_step = device.type == "cuda"
    width, max_new = input_ids.shape[1], plan.max_new_tokens
    st = _state(core)
    cache = _cache_for(core, st, width + max_new)
    step = _step_fn(st, plan.sampling, compile_step, backend)
    vocab = core.config.get_text_config().vocab_size
    zero = torch.zeros(1, vocab, device=device)
    ban = _eos_bias(vocab, plan.eos_ids, device) if plan.min_new_tokens > 0 else zero
    positions = torch.arange(width, width + max_new, device=device).unsqueeze(0)
    out = torch.empty(1, max_new, dtype=torch.long, device=device)
    if st.seen is None or st.seen.shape[1] != vocab or st.seen.device != device:
        st.seen = torch.zeros(1, vocab, dtype=torch.bool, device=device)
        # One address for good: the compiled step writes to it, which CUDA graphs allow
        # only for static inputs.
        torch._dynamo.mark_static_address(st.seen)
    seen = st.seen
    seen.zero_()
    if plan.sampling.repetition_penalty != 1.0:
        seen.scatter_(1, input_ids, True)
    if streamer is not None:
        streamer.put(input_ids.cpu())

    # Prefill: the plain forward (one call per prompt; compiling it would mean one graph
    # per prompt length), only the last position's logits.
    pre = core(
        input_ids=input_ids,
        position_ids=torch.arange(width, device=device).unsqueeze(0),
        use_cache=True,
        logits_to_keep=1,
        **{st.cache_arg: cache},
    )
    bias = ban if plan.min_new_tokens > 0 else zero
    out[:, :1].copy_(choose(pre.logits[:, -1, :] + bias, plan.sampling, seen))
    n, checked = 1, 0  # tokens in ``out`` (some maybe still being made); EOS-free prefix
    while True:
        # Tokens the host must see now: the newest one for the streamer, or a batch of them
        # for the EOS check. Their copy is queued *before* the next step, so that step runs
        # on the device while the host waits for the copy: the device never idles for it.
        lo = n - 1 if streamer is not None else checked
        read = streamer is not None or n - lo >= EOS_CHECK_EVERY or n == max_new
        pending = _to_host(out[0, lo:n]) if read else None
        more = n < max_new
        if more:
            bias = ban if n < plan.min_new_tokens else zero
            # Slices of preallocated tensors: no per-step allocation; copying the step's
            # output out at once frees the CUDA graph's output buffer for the next replay.
            nxt = step(core, out[:, n - 1 : n], positions[:, n - 1 : n], cache, bias, seen)
            out[:, n : n + 1].copy_(nxt)
        if pending is not None:
            seen_now = _wait(pending)
            if streamer is not None:
                streamer.put(seen_now)
            stop = _first_eos(seen_now.tolist(), plan.eos_ids)
            if stop is not None:
                n = lo + stop + 1  # what was made after the EOS is dropped
                break
            checked = n
        if not more:
            break
        n += 1
    if streamer is not None:
        streamer.end()
    return out[:, :n]
