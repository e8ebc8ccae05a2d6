"""``tunesmith deploy --infer_backend llamacpp``: the same HTTP app, answered by llama.cpp.

Every served name (the base model and each ``--adapters name=CKPT``, merged) is a GGUF file
exported once and cached, as ``infer --infer_backend llamacpp`` makes it, loaded at start into
its own ``Llama``. A ``Llama`` holds one sequence's KV cache, so requests are answered one at
a time, in arrival order, by one thread: the only one that touches the models. Waiting
requests keep the pt scheduler's semantics: a request whose client left is dropped, one that
waited past ``--request_timeout`` ends with ``timeout``, and a running answer stops at the
next token when either happens. A prompt sharing its start with the previous request's (the
system prompt, earlier turns of a chat) only evaluates what is new.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from tunesmith.config import DeployArgs, InferCommandArgs, from_dict
from tunesmith.infer.llamacpp_backend import LlamaCppEngine, decode_ids, render_text
from tunesmith.infer.llamacpp_sampling import Sampling as LlamaSampling
from tunesmith.serve.models import Adapter, Catalog, parse_adapters
from tunesmith.serve.scheduler import Job, JobQueue, find_stop, partial_stop
from tunesmith.utils import UserError, error_line, logger


@dataclass
class GgufTokenizer:
    """A GGUF file's chat template and tokenizer, with the two calls the HTTP app makes of a
    transformers tokenizer (so ``app.py`` serves both backends unchanged)."""

    engine: LlamaCppEngine
    """The base model's engine (its chat template and vocabulary)."""

    def apply_chat_template(
        self, messages: list[dict[str, str]], tokenize: bool = False,
        add_generation_prompt: bool = True,
    ) -> str:  # fmt: skip
        """The prompt text of ``messages`` (always with the generation prompt)."""
        return render_text(self.engine, messages)

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        """``{"input_ids": ...}`` of ``text``; special tokens written in it are parsed, and a
        BOS is added where the model wants one (``add_special_tokens``)."""
        ids = self.engine.llm.tokenize(text.encode("utf-8"), add_bos=add_special_tokens,
                                       special=True)  # fmt: skip
        return {"input_ids": ids}


def load_engines(args: DeployArgs) -> tuple[dict[str | None, LlamaCppEngine], Catalog]:
    """The engines by adapter name (None: the base model) and the catalog of served names."""
    from tunesmith.infer.llamacpp_backend import import_llama_cpp, load_llamacpp
    from tunesmith.model.adapters import resolve_base
    from tunesmith.options import model_options
    from tunesmith.serve.models import _short_name

    import_llama_cpp()  # say it is missing before minutes of exporting
    if args.adapter_root is not None:
        raise UserError(
            "--adapter_root is not served by --infer_backend llamacpp (each adapter is merged "
            "into its own GGUF file at start); list them with --adapters name=CHECKPOINT, or "
            "use --infer_backend pt"
        )
    paths = parse_adapters(args.adapters)
    infer_args = from_dict(InferCommandArgs, {
        "model": args.model, "adapters": [str(p) for p in paths.values()], "use_hf": args.use_hf,
        "system": args.system, "model_type": args.model_type, "template": args.template,
        "infer_backend": "llamacpp", "gguf_type": args.gguf_type,
        "max_model_len": args.max_model_len,
    })  # fmt: skip
    base = resolve_base(model_options(infer_args), infer_args.adapters, infer_args.system)
    served = args.served_model_name or _short_name(base.name)
    if served in paths:
        raise UserError(f"--adapters: '{served}' is also the base model's name")
    catalog = Catalog(served, args.system)
    base_args = replace(infer_args, model=args.model or str(base.model_dir), adapters=[])
    engines: dict[str | None, LlamaCppEngine] = {None: load_llamacpp(base_args)}
    for i, (name, path) in enumerate(paths.items()):
        engine = load_llamacpp(replace(infer_args, adapters=[str(path)]))
        catalog.adapters[name] = Adapter(path, f"a{i}", engine.system)
        engines[f"a{i}"] = engine
        logger.info(f"adapter {name}: {path} (merged into {engine.path.name})")
    return engines, catalog


def sampling_defaults(defaults: dict[str, Any]) -> dict[str, Any]:
    """Values for sampling fields a request leaves out, from the model's generation config
    keys: as ``models.default_sampling`` does for ``pt``."""
    rp = float(defaults.get("repetition_penalty") or 1.0)
    if not defaults.get("do_sample", False):
        return {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": rp}
    return {
        "temperature": float(defaults.get("temperature") or 1.0),
        "top_p": float(defaults.get("top_p") or 1.0),
        "top_k": int(defaults.get("top_k") or 0),
        "repetition_penalty": rp,
    }


class LlamaScheduler(JobQueue):
    """The pt ``Scheduler``'s interface over llama.cpp engines, one request at a time."""

    def __init__(self, engines: dict[str | None, LlamaCppEngine]) -> None:
        super().__init__("tunesmith-llamacpp")
        self.engines = engines
        self.current: Job | None = None

    def running(self) -> int:
        """Requests decoding now (0 or 1)."""
        return int(self.current is not None)

    def _loop(self) -> None:
        while True:
            with self.wake:
                while not self.stopping and not self.waiting:
                    self.wake.wait()
                if self.stopping:
                    return
                job = self.current = self.waiting.popleft()
            try:
                self._answer(job)
            except Exception as e:  # a failed answer must not take the server down
                logger.exception("generation failed")
                if not job.cancelled.is_set():
                    job.emit("error", f"generation failed: {error_line(e)}")
            finally:
                self.current = None

    def _answer(self, job: Job) -> None:
        """Decode ``job`` to its end, emitting text as the pt scheduler does."""
        if job.cancelled.is_set():
            return
        if time.monotonic() > job.deadline:  # waited in the queue for all of its time
            job.emit("done", ("timeout", 0))
            return
        engine = self.engines.get(job.adapter)
        if engine is None:
            job.emit("error", f"adapter {job.adapter} is not loaded")
            return
        if len(job.prompt) >= engine.n_ctx:
            job.emit("error", f"the prompt is {len(job.prompt)} tokens; the model's context "
                     f"is {engine.n_ctx}")  # fmt: skip
            return
        q = job.sampling
        s = LlamaSampling(q.temperature > 0, q.temperature if q.temperature > 0 else 1.0,
                          q.top_k, q.top_p, q.repetition_penalty)  # fmt: skip
        budget = min(job.max_tokens, engine.n_ctx - len(job.prompt))
        answer = b""
        for token in decode_ids(engine, job.prompt, s, np.random.default_rng(q.seed), budget):
            if job.cancelled.is_set() or self.stopping:
                return
            if time.monotonic() > job.deadline:
                job.emit("done", ("timeout", len(job.tokens)))
                return
            job.tokens.append(token)
            self.generated += 1
            answer += engine.llm.detokenize([token])
            text = answer.decode("utf-8", "replace")
            cut = find_stop(text, job.stops, job.sent)
            if cut is not None:
                _send(job, text[:cut])
                job.emit("done", ("stop", len(job.tokens)))
                return
            if not text.endswith("\ufffd"):  # else half a UTF-8 character: wait for the rest
                _send(job, text[: len(text) - partial_stop(text, job.stops)])
        _send(job, answer.decode("utf-8", "replace"))
        if len(job.tokens) >= budget:
            job.emit("done", ("length", len(job.tokens)))
        else:  # the end-of-turn token counts, as on pt
            job.emit("done", ("stop", len(job.tokens) + 1))


def _send(job: Job, text: str) -> None:
    if len(text) > job.sent:
        job.emit("text", text[job.sent :])
        job.sent = len(text)


def build_llamacpp(args: DeployArgs) -> tuple[LlamaScheduler, GgufTokenizer, Catalog, dict]:
    """(scheduler, tokenizer, catalog, sampling defaults) of ``deploy --infer_backend
    llamacpp``; ``--max_prompt_tokens`` is lowered to what the context leaves room for."""
    engines, catalog = load_engines(args)
    base = engines[None]
    room = min(e.n_ctx for e in engines.values()) - 1
    if args.max_prompt_tokens > room:
        args.max_prompt_tokens = room
    if args.max_concurrent > 1:
        logger.info("llamacpp: requests are answered one at a time (others wait in the queue)")
    return LlamaScheduler(engines), GgufTokenizer(base), catalog, sampling_defaults(base.defaults)
