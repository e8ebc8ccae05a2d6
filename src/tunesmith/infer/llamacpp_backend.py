"""The optional llama.cpp backend, ``--infer_backend llamacpp`` (CPUs, ``tunesmith[llamacpp]``).

On a CPU, llama.cpp decodes several times faster than PyTorch (bench/RESULTS.md), and tunesmith
already writes the GGUF files it reads. The model runs through llama-cpp-python's ``Llama``
(weights, KV cache, batched prompt evaluation); the chat template, the sampling and the decode
loop are tunesmith's own, so they mean what they mean on the ``pt`` backend:

- prompts are rendered with the GGUF's chat template by transformers' own Jinja renderer, and
  tokenized by llama.cpp (the same ids as the tokenizer of the exported model);
- sampling follows transformers' ``generate``: unset flags keep the model's
  ``generation_config.json`` (none for a bare ``.gguf``: greedy), ``--temperature 0`` is
  greedy, the repetition penalty covers the prompt too, then temperature, top-k, top-p;
- an answer ends at an end-of-generation token of the GGUF (``<|im_end|>``…), a stop string
  (not included) or ``max_new_tokens``; streamed pieces concatenate to the complete answer.

A prompt that shares a prefix with the previous one (the next turn of a chat, a shared system
prompt) only evaluates what is new: llama.cpp keeps the KV cache of the last request.

API for other commands (``eval``, ``deploy``)::

    engine = load_llamacpp(args)            # InferCommandArgs-like: model/adapters/gguf_type/…
    engine = load_gguf(path, system=..., max_model_len=..., defaults=..., seed=...)
    text = engine.generate(messages, GenOptions(max_new_tokens=256, temperature=0))
    for piece in engine.stream(messages, gen): ...
    answers = engine.generate_many(conversations, gen)   # in input order
"""

from __future__ import annotations

import codecs
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tunesmith.config import InferCommandArgs
from tunesmith.options import model_options
from tunesmith.utils import UserError, error_line, logger

INSTALL_HINT = (
    "pip install 'tunesmith[llamacpp]' (it compiles llama.cpp: a C++ compiler and cmake, "
    "about 8 minutes on 2 cores)"
)
AUTO_ARCHS = ("qwen2", "llama")
"""Architectures ``--infer_backend auto`` runs on llama.cpp: those tunesmith's GGUF writer makes
and whose answers the equivalence tests compare with ``pt``'s."""
DEFAULT_MAX_CTX = 8192
"""Context size without ``--max_model_len`` (the model's own when smaller): llama.cpp allocates
the whole KV cache up front, and 32k tokens of a 7B model would be 1.8 GB."""


@dataclass
class GenOptions:
    """How to generate one answer; ``None`` keeps the model's generation config, as on ``pt``."""

    max_new_tokens: int = 512
    """Most tokens generated (fewer when the context is full)."""
    temperature: float | None = None
    """Sampling temperature; 0 = greedy."""
    top_p: float | None = None
    """Nucleus sampling probability mass."""
    top_k: int | None = None
    """Sample from the k most likely tokens."""
    repetition_penalty: float | None = None
    """transformers' repetition penalty over prompt and answer (1.0 = none)."""
    seed: int | None = None
    """Seed this answer's sampling alone; None continues the engine's random stream."""
    stop: list[str] = field(default_factory=list)
    """Strings that end the answer (not included in it)."""


def gen_options(args: InferCommandArgs) -> GenOptions:
    """The ``GenOptions`` of ``infer``'s flags (``--max_new_tokens``, ``--temperature`` …)."""
    return GenOptions(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
    )


@dataclass
class Sampling:
    """Resolved sampling settings of one request (transformers' defaults under the flags)."""

    do_sample: bool
    """False: greedy (argmax after the repetition penalty)."""
    temperature: float
    """Divides the logits when sampling."""
    top_k: int
    """Keep the k most likely tokens (0: all)."""
    top_p: float
    """Keep the smallest set of tokens whose probability reaches this."""
    repetition_penalty: float
    """Logits of tokens already in the sequence: divided (positive) or multiplied (negative)."""


def resolve_sampling(gen: GenOptions, defaults: dict[str, Any]) -> Sampling:
    """``gen`` over the model's generation config over transformers' defaults, as ``pt`` does."""

    def pick(name: str, fallback: Any) -> Any:
        value = getattr(gen, name)
        return value if value is not None else defaults.get(name, fallback)

    if gen.temperature is not None:
        do_sample = gen.temperature > 0
    else:
        do_sample = bool(defaults.get("do_sample", False))
    temperature = float(pick("temperature", 1.0)) if do_sample else 1.0
    return Sampling(do_sample, temperature, int(pick("top_k", 50) or 0),
                    float(pick("top_p", 1.0)), float(pick("repetition_penalty", 1.0)))  # fmt: skip


def generation_config(model_dir: Path | None) -> dict[str, Any]:
    """The sampling keys of ``model_dir/generation_config.json`` ({} when absent)."""
    path = model_dir / "generation_config.json" if model_dir else None
    if path is None or not path.is_file():
        return {}
    cfg = json.loads(path.read_text(encoding="utf-8"))
    keys = ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty")
    return {k: cfg[k] for k in keys if cfg.get(k) is not None}


def token_probs(logits: np.ndarray, seen: np.ndarray, s: Sampling) -> tuple[np.ndarray, np.ndarray]:
    """The candidate next tokens and their probabilities, from the last position's ``logits``
    (float32, modified in place); greedy decoding gives the one argmax token.

    ``seen`` marks every token id of the sequence so far (prompt included), as transformers'
    ``RepetitionPenaltyLogitsProcessor`` reads ``input_ids``; the order of the warpers
    (penalty, temperature, top-k, top-p) is ``generate``'s.
    """
    if s.repetition_penalty != 1.0:
        rp = s.repetition_penalty
        hit = logits[seen]
        logits[seen] = np.where(hit < 0, hit * rp, hit / rp)
    if not s.do_sample:
        return np.array([int(np.argmax(logits))]), np.ones(1)
    ids = np.arange(logits.size)
    if 0 < s.top_k < logits.size:
        ids = np.argpartition(-logits, s.top_k - 1)[: s.top_k]
    vals = logits[ids].astype(np.float64) / s.temperature
    order = np.argsort(-vals, kind="stable")
    ids, vals = ids[order], vals[order]
    probs = np.exp(vals - vals[0])
    probs /= probs.sum()
    if s.top_p < 1.0:
        # Keep tokens until their mass reaches top_p (the one that crosses it included).
        keep = int(np.searchsorted(np.cumsum(probs), s.top_p) + 1)
        ids, probs = ids[:keep], probs[:keep] / probs[:keep].sum()
    return ids, probs


def pick_token(logits: np.ndarray, seen: np.ndarray, s: Sampling, rng: np.random.Generator) -> int:
    """The next token: :func:`token_probs`' argmax, or a draw from its distribution."""
    ids, probs = token_probs(logits, seen, s)
    return int(ids[0]) if ids.size == 1 else int(rng.choice(ids, p=probs))


def pt_only_flags(args: InferCommandArgs) -> list[str]:
    """Flags of ``args`` that only the ``pt`` backend honours (set to a non-default value)."""
    checks = (
        ("--fast_decode true", args.fast_decode),
        ("--merge_lora true", args.merge_lora),
        (f"--torch_dtype {args.torch_dtype}", args.torch_dtype != "auto"),
        (f"--attn_impl {args.attn_impl}", args.attn_impl != "sdpa"),
        (f"--max_batch_size {args.max_batch_size}", args.max_batch_size is not None),
    )
    return [flag for flag, used in checks if used]


def _model_arch(args: InferCommandArgs) -> str | None:
    """The architecture ``--model`` / ``--adapters`` will run (no weights are read)."""
    from tunesmith.model.adapters import resolve_base
    from tunesmith.model.gguf_cache import is_gguf_file

    if is_gguf_file(args.model) and not args.adapters:
        return gguf_header(Path(args.model).expanduser())["arch"]
    cfg = json.loads(
        (
            resolve_base(model_options(args), args.adapters, args.system).model_dir / "config.json"
        ).read_text(encoding="utf-8")
    )
    rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    if rope.get("rope_type", rope.get("type")) not in (None, "default"):
        return None  # the GGUF writer refuses RoPE scaling
    return cfg.get("model_type")


def choose_backend(args: InferCommandArgs) -> str:
    """``--infer_backend``, with ``auto`` resolved: ``llamacpp`` on a machine without CUDA where
    llama-cpp-python is installed, the architecture is one of ``AUTO_ARCHS`` and no flag asks
    for something only ``pt`` does; else ``pt``. One line says which and why."""
    import importlib.util

    import torch

    if args.infer_backend != "auto":
        return args.infer_backend
    if torch.cuda.is_available():
        return "pt"
    if importlib.util.find_spec("llama_cpp") is None:
        logger.info(f"inference backend: pt (llama.cpp answers several times faster on CPUs: "
                    f"{INSTALL_HINT})")  # fmt: skip
        return "pt"
    why = pt_only_flags(args)
    arch = None if why else _model_arch(args)
    if not why and arch not in AUTO_ARCHS:
        why = [f"architecture {arch}"]
    if why:
        logger.info(f"inference backend: pt (for {', '.join(why)}; --infer_backend llamacpp "
                    "to force llama.cpp)")  # fmt: skip
        return "pt"
    logger.info(f"inference backend: llamacpp (llama.cpp on {cpu_threads()} CPU threads, "
                f"{args.gguf_type} GGUF; --infer_backend pt for PyTorch)")  # fmt: skip
    return "llamacpp"


def import_llama_cpp() -> Any:
    """The ``llama_cpp`` module, or a UserError with the install command."""
    try:
        import llama_cpp
    except ImportError:
        raise UserError(
            f"--infer_backend llamacpp needs llama-cpp-python, which is not installed: "
            f"{INSTALL_HINT}"
        ) from None
    return llama_cpp


def cpu_threads() -> int:
    """CPU cores this process may use (llama.cpp's thread count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def gguf_header(path: Path) -> dict[str, Any]:
    """Architecture, training context length and chat template of a GGUF file (no weights read)."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except (ValueError, OSError) as e:
        raise UserError(f"{path}: not a readable GGUF file ({error_line(e)})") from None

    def value(key: str) -> Any:
        f = reader.fields.get(key)
        return f.contents() if f is not None else None

    arch = value("general.architecture")
    return {
        "arch": arch,
        "context_length": value(f"{arch}.context_length"),
        "chat_template": value("tokenizer.chat_template"),
    }


def context_size(header: dict[str, Any], max_model_len: int | None, path: Path) -> int:
    """llama.cpp's ``n_ctx``: ``--max_model_len``, else the model's (at most 8192)."""
    trained = int(header.get("context_length") or DEFAULT_MAX_CTX)
    if max_model_len is None:
        return min(trained, DEFAULT_MAX_CTX)
    if max_model_len < 2:
        raise UserError(f"--max_model_len must be at least 2, got {max_model_len}")
    if max_model_len > trained:
        raise UserError(
            f"--max_model_len {max_model_len} is more than the context length {path.name} was "
            f"trained for ({trained})"
        )
    return max_model_len


@dataclass
class LlamaCppEngine:
    """A GGUF model on llama.cpp, ready to answer chat messages."""

    llm: Any
    """The ``llama_cpp.Llama`` instance (owns the weights and the KV cache)."""
    path: Path
    """The GGUF file."""
    system: str | None
    """Default system prompt (the training run's, unless overridden)."""
    defaults: dict[str, Any]
    """Sampling keys of the model's ``generation_config.json`` ({} for a bare GGUF: greedy)."""
    chat_template: str
    """The GGUF's ``tokenizer.chat_template``."""
    special: dict[str, str]
    """``bos_token`` / ``eos_token`` texts, which some chat templates use."""
    n_ctx: int
    """Context size: prompt + answer tokens."""
    rng: np.random.Generator
    """The engine's random stream for sampling (seeded at load)."""

    def generate(self, messages: list[dict[str, str]], gen: GenOptions) -> str:
        """The complete answer to ``messages``."""
        return "".join(self.stream(messages, gen))

    def stream(self, messages: list[dict[str, str]], gen: GenOptions) -> Iterator[str]:
        """The answer to ``messages`` in pieces as they are generated."""
        return stream_text(self, messages, gen)

    def generate_many(
        self, conversations: list[list[dict[str, str]]], gen: GenOptions, progress: bool = True
    ) -> list[str]:
        """Answers to many conversations, in their order (one at a time, with a progress bar)."""
        from tqdm import tqdm

        bar = tqdm(conversations, unit="rec", desc="infer", disable=not progress)
        return [self.generate(m, gen) for m in bar]


def load_gguf(
    path: Path,
    *,
    system: str | None = None,
    max_model_len: int | None = None,
    defaults: dict[str, Any] | None = None,
    seed: int = 42,
    threads: int | None = None,
) -> LlamaCppEngine:
    """Load a GGUF file into llama.cpp, on ``threads`` threads (default: every usable core)."""
    llama_cpp = import_llama_cpp()
    path = Path(path)
    header = gguf_header(path)
    n_ctx = context_size(header, max_model_len, path)
    if not header["chat_template"]:
        raise UserError(f"{path}: the GGUF file has no chat template (tokenizer.chat_template)")
    threads = threads or cpu_threads()
    try:
        llm = llama_cpp.Llama(
            model_path=str(path), n_ctx=n_ctx, n_batch=512, n_threads=threads,
            n_threads_batch=threads, seed=seed, verbose=False,
        )  # fmt: skip
    except ValueError as e:
        arch = header["arch"]
        why = f"architecture '{arch}'" if arch not in AUTO_ARCHS else error_line(e)
        raise UserError(
            f"{path}: llama.cpp (llama-cpp-python {llama_cpp.__version__}) cannot load this "
            f"GGUF file ({why}); use --infer_backend pt"
        ) from None
    special = {
        "bos_token": llm.detokenize([llm.token_bos()], special=True).decode("utf-8", "replace"),
        "eos_token": llm.detokenize([llm.token_eos()], special=True).decode("utf-8", "replace"),
    }
    logger.info(f"llama.cpp loaded {path.name} ({header['arch']}, context {n_ctx}, "
                f"{threads} threads)")  # fmt: skip
    return LlamaCppEngine(llm, path, system, defaults or {}, header["chat_template"], special,
                          n_ctx, np.random.default_rng(seed))  # fmt: skip


def load_llamacpp(args: InferCommandArgs) -> LlamaCppEngine:
    """The engine for ``--model`` / ``--adapters`` (``InferCommandArgs`` or a superset): the
    GGUF file exported once and cached (``model/gguf_cache.py``), the run's system prompt and
    the base model's generation config, as the ``pt`` backend would use them."""
    import_llama_cpp()  # say it is missing before a minute of exporting
    from tunesmith.model.adapters import run_args
    from tunesmith.model.gguf_cache import cached_gguf

    path, base_dir = cached_gguf(args)
    system = args.system
    if system is None and args.adapters:
        system = run_args(Path(args.adapters[0]).expanduser()).get("system")
    return load_gguf(path, system=system, max_model_len=args.max_model_len,
                     defaults=generation_config(base_dir), seed=args.seed)  # fmt: skip


def render_prompt(engine: LlamaCppEngine, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of ``messages`` with the generation prompt, as ``pt`` renders and tokenizes
    them (transformers' Jinja renderer, no BOS beyond what the template writes)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(
        conversations=[messages], chat_template=engine.chat_template,
        add_generation_prompt=True, **engine.special,
    )  # fmt: skip
    return engine.llm.tokenize(rendered[0].encode("utf-8"), add_bos=False, special=True)


def _prefill(llm: Any, ids: list[int]) -> None:
    """Evaluate the prompt, reusing the KV cache of the longest prefix shared with the last one.

    ``Llama.eval`` drops the cache beyond ``n_tokens`` before evaluating; the last prompt
    token is always evaluated again, since its logits are the ones sampled next.
    """
    cached = llm.input_ids[: llm.n_tokens]
    m = min(len(cached), len(ids))
    same = cached[:m] == np.asarray(ids[:m])
    common = m if bool(same.all()) else int(np.argmin(same))
    llm.n_tokens = min(common, len(ids) - 1)
    llm.eval(ids[llm.n_tokens :])


def generate_ids(
    engine: LlamaCppEngine, messages: list[dict[str, str]], gen: GenOptions
) -> Iterator[int]:
    """The answer's token ids, one at a time (end-of-generation token excluded)."""
    import llama_cpp

    llm = engine.llm
    ids = render_prompt(engine, messages)
    if len(ids) >= engine.n_ctx:
        raise UserError(
            f"the conversation is {len(ids)} tokens, more than --max_model_len {engine.n_ctx} "
            "leaves room for; shorten it (/clear in the chat) or raise --max_model_len"
        )
    s = resolve_sampling(gen, engine.defaults)
    rng = engine.rng if gen.seed is None else np.random.default_rng(gen.seed)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    n_vocab = llm.n_vocab()
    seen = np.zeros(n_vocab, dtype=bool)
    seen[ids] = True
    _prefill(llm, ids)
    for _ in range(min(gen.max_new_tokens, engine.n_ctx - len(ids))):
        ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        logits = np.ctypeslib.as_array(ptr, shape=(n_vocab,)).copy()
        token = pick_token(logits, seen, s, rng)
        if llama_cpp.llama_vocab_is_eog(vocab, token):
            return
        yield token
        seen[token] = True
        llm.eval([token])


def _held_back(text: str, stops: list[str]) -> int:
    """Characters at the end of ``text`` that may be the start of a stop string."""
    for n in range(min(len(text), max(map(len, stops)) - 1), 0, -1):
        if any(stop.startswith(text[-n:]) for stop in stops):
            return n
    return 0


def stream_text(
    engine: LlamaCppEngine, messages: list[dict[str, str]], gen: GenOptions
) -> Iterator[str]:
    """Decoded text as it is generated: whole UTF-8 characters only, stop strings cut off."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    stops = [s for s in gen.stop if s]
    text, sent = "", 0
    for token in generate_ids(engine, messages, gen):
        text += decoder.decode(engine.llm.detokenize([token], special=False))
        if stops:
            hits = [i for i in (text.find(s, sent) for s in stops) if i >= 0]
            if hits:
                if min(hits) > sent:
                    yield text[sent : min(hits)]
                return
        ready = len(text) - (_held_back(text, stops) if stops else 0)
        if ready > sent:
            yield text[sent:ready]
            sent = ready
    text += decoder.decode(b"", final=True)
    if len(text) > sent:
        yield text[sent:]
