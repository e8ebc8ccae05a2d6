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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tunesmith.config import InferCommandArgs
from tunesmith.infer.llamacpp_sampling import (
    GenOptions,
    Sampling,
    generation_config,
    pick_token,
    resolve_sampling,
)
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


def pt_only_flags(args: InferCommandArgs) -> list[str]:
    """Flags of ``args`` that only the ``pt`` backend honours (set to a non-default value)."""
    checks = (
        ("--fast_decode true", args.fast_decode),
        ("--merge_lora true", args.merge_lora),
        (f"--torch_dtype {args.torch_dtype}", args.torch_dtype != "auto"),
        (f"--attn_impl {args.attn_impl}", args.attn_impl != "sdpa"),
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
    from tunesmith.model.gguf_header import GGUFFormatError, read_kv

    try:
        kv = read_kv(path)
    except (GGUFFormatError, OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable GGUF file ({error_line(e)})") from None
    arch = kv.get("general.architecture")
    return {
        "arch": arch,
        "context_length": kv.get(f"{arch}.context_length"),
        "chat_template": kv.get("tokenizer.chat_template"),
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
    engine = LlamaCppEngine(llm, path, system, defaults or {}, header["chat_template"], special,
                            n_ctx, np.random.default_rng(seed))  # fmt: skip
    prime(engine)
    return engine


def shared_prefix(engine: LlamaCppEngine, system: str | None) -> list[int]:
    """The prompt tokens every first turn under ``system`` begins with (the template's header,
    the system prompt or the template's default one), without the last of them, which a
    user's first word might merge with."""
    head = [{"role": "system", "content": system}] if system is not None else []
    a, b = (render_prompt(engine, [*head, {"role": "user", "content": q}]) for q in ("A", "B"))
    n = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), len(a))
    return a[: max(n - 1, 0)]


def prime(engine: LlamaCppEngine) -> None:
    """Evaluate the default system prompt's :func:`shared_prefix` once, at load.

    The first answer then evaluates only the user's words (``_prefill`` keeps a shared
    prefix), and the one-off costs of a first request are paid before anyone waits: importing
    and compiling the chat template (0.7 s) and reading the mapped weights into memory (a
    first 64-token prefill of the demo model took 1.2 s, later ones 0.35 s; bench/RESULTS.md).
    """
    ids = shared_prefix(engine, engine.system) or [engine.llm.token_bos()]
    engine.llm.n_tokens = 0
    engine.llm.eval(ids[: engine.n_ctx - 1])  # a tiny --max_model_len: part of it still helps


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


def render_text(engine: LlamaCppEngine, messages: list[dict[str, str]]) -> str:
    """``messages`` rendered by the GGUF's chat template with the generation prompt
    (transformers' Jinja renderer, as ``pt``'s ``apply_chat_template``)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(
        conversations=[messages], chat_template=engine.chat_template,
        add_generation_prompt=True, **engine.special,
    )  # fmt: skip
    return rendered[0]


def render_prompt(engine: LlamaCppEngine, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of ``messages`` with the generation prompt, as ``pt`` renders and tokenizes
    them (no BOS beyond what the template writes)."""
    return engine.llm.tokenize(render_text(engine, messages).encode("utf-8"), add_bos=False,
                               special=True)  # fmt: skip


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
    ids = render_prompt(engine, messages)
    if len(ids) >= engine.n_ctx:
        raise UserError(
            f"the conversation is {len(ids)} tokens, more than --max_model_len {engine.n_ctx} "
            "leaves room for; shorten it (/clear in the chat) or raise --max_model_len"
        )
    rng = engine.rng if gen.seed is None else np.random.default_rng(gen.seed)
    s = resolve_sampling(gen, engine.defaults)
    return decode_ids(engine, ids, s, rng, gen.max_new_tokens)


def decode_ids(
    engine: LlamaCppEngine, ids: list[int], s: Sampling, rng: np.random.Generator, max_new: int
) -> Iterator[int]:
    """The answer to prompt ``ids`` (shorter than the context) under resolved sampling ``s``:
    token ids one at a time, at most ``max_new`` and what the context has room for, until an
    end-of-generation token (not yielded). Closing the iterator early is safe: the KV cache
    stays consistent with ``llm.n_tokens``."""
    import llama_cpp

    llm = engine.llm
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    n_vocab = llm.n_vocab()
    seen = np.zeros(n_vocab, dtype=bool)
    seen[ids] = True
    _prefill(llm, ids)
    token = -1
    for i in range(min(max_new, engine.n_ctx - len(ids))):
        if i:  # the previous token, evaluated only when another one is wanted
            llm.eval([token])
        ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        logits = np.ctypeslib.as_array(ptr, shape=(n_vocab,)).copy()
        token = pick_token(logits, seen, s, rng)
        if llama_cpp.llama_vocab_is_eog(vocab, token):
            return
        yield token
        seen[token] = True


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
