"""``tunesmith infer``: an interactive multi-turn chat, one answer per piped line, or (with
``--val_dataset``) batch inference over data files, on the ``pt``, ``vllm`` or ``llamacpp``
backend."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import torch

from tunesmith.config import InferCommandArgs
from tunesmith.infer.engine import chat_messages, generate, generation_kwargs, load_engine
from tunesmith.utils import UserError, logger

HELP = "commands: /clear (forget the conversation), /system TEXT (new system prompt), /exit"

# One answer: (messages, where to stream the text or None) -> the answer.
Reply = Callable[[list[dict[str, str]], TextIO | None], str]
# Many answers at once, in order (batch inference).
ReplyMany = Callable[[list[list[dict[str, str]]]], list[str]] | None


def infer(args: InferCommandArgs, progress: bool = True) -> Path | None:
    """Chat in the terminal, answer each line of piped stdin, or answer ``--val_dataset``
    (then returns the written result file; ``progress``: its progress bar)."""
    prompts = None
    if args.val_dataset:  # bad data is reported before the slow model load
        from tunesmith.infer.batch import load_prompts

        prompts = load_prompts(args.val_dataset, args.use_hf, args.seed)
    engine, reply, reply_many = load_backend(args)
    if prompts is not None:
        from tunesmith.infer.batch import infer_dataset

        gen = generation_kwargs(args, engine.tokenizer) if reply_many is None else {}
        return infer_dataset(engine, args, gen, prompts, progress, answer_many=reply_many)
    chat(reply, engine.system, args.stream)
    return None


def load_backend(args: InferCommandArgs) -> tuple[Any, Reply, ReplyMany]:
    """(engine, one answer, many answers) of ``--infer_backend`` (``auto`` resolved in place:
    ``args.infer_backend`` then names the backend used); the engine has ``system``."""
    from tunesmith.infer.llamacpp_backend import choose_backend

    backends = {"pt": _pt_backend, "vllm": _vllm_backend, "llamacpp": _llamacpp_backend}
    args.infer_backend = choose_backend(args)
    return backends[args.infer_backend](args)


def _pt_backend(args: InferCommandArgs) -> tuple[Any, Reply, ReplyMany]:
    engine = load_engine(args)
    if args.merge_lora and args.adapters:
        from tunesmith.model.adapters import check_adapter, merge_and_save, merged_dir

        out = merged_dir(check_adapter(args.adapters[-1]), None)
        engine.model = merge_and_save(engine.model, engine.tokenizer, out)
    gen = generation_kwargs(args, engine.tokenizer)
    torch.manual_seed(args.seed)
    return engine, lambda messages, out: generate(engine, messages, gen, out), None


def _vllm_backend(args: InferCommandArgs) -> tuple[Any, Reply, ReplyMany]:
    """vLLM with the adapter applied natively, or on the merged model with --merge_lora."""
    from tunesmith.infer.vllm_backend import import_vllm, load_vllm_engine, vllm_generate
    from tunesmith.model.adapters import resolve_base
    from tunesmith.model.load import load_tokenizer
    from tunesmith.options import model_options

    import_vllm()  # say it is missing before minutes of merging
    base = resolve_base(model_options(args), args.adapters, args.system)
    model_dir, adapter = base.model_dir, (base.adapters[-1] if base.adapters else None)
    if len(base.adapters) > 1 or (adapter is not None and args.merge_lora):
        # vLLM applies one adapter per request: fold them into the base first (the seeds'
        # `--merge_lora true --infer_backend vllm`), then free the GPU for vLLM.
        from tunesmith.model.adapters import merge_and_save, merged_dir

        pt = load_engine(args)
        model_dir = merged_dir(base.adapters[-1], None)
        merge_and_save(pt.model, pt.tokenizer, model_dir)
        del pt
        torch.cuda.empty_cache()
        adapter = None
    engine = load_vllm_engine(args, model_dir, load_tokenizer(base.tokenizer_dir), adapter,
                              base.system)  # fmt: skip
    if args.stream:
        logger.info("note: the vLLM backend prints each answer when it is complete")

    def reply(messages: list[dict[str, str]], out: TextIO | None) -> str:
        answer = vllm_generate(engine, [messages], args)[0]
        if out is not None:
            out.write(answer + ("" if answer.endswith("\n") else "\n"))
            out.flush()
        return answer

    return engine, reply, lambda convs: vllm_generate(engine, convs, args)


def _llamacpp_backend(args: InferCommandArgs) -> tuple[Any, Reply, ReplyMany]:
    """llama.cpp on the GGUF export of the model (merged with the adapters), cached."""
    from tunesmith.infer.llamacpp_backend import load_llamacpp, pt_only_flags
    from tunesmith.infer.llamacpp_sampling import gen_options

    if args.merge_lora:
        raise UserError(
            "--merge_lora true saves a merged Hugging Face directory, which the llamacpp "
            "backend does not write (it merges into its cached GGUF file); drop the flag, or "
            "use --infer_backend pt"
        )
    if ignored := pt_only_flags(args):
        logger.info(f"note: the llamacpp backend ignores {', '.join(ignored)}")
    engine = load_llamacpp(args)
    gen = gen_options(args)

    def reply(messages: list[dict[str, str]], out: TextIO | None) -> str:
        if out is None:
            return engine.generate(messages, gen)
        pieces = []
        for piece in engine.stream(messages, gen):
            out.write(piece)
            out.flush()
            pieces.append(piece)
        answer = "".join(pieces)
        if not answer.endswith("\n"):
            out.write("\n")
        return answer

    def reply_many(convs: list[list[dict[str, str]]]) -> list[str]:
        from tunesmith.infer.llamacpp_batch import answer_batch

        return answer_batch(engine, convs, gen, args.max_batch_size)

    return engine, reply, reply_many


def chat(reply: Reply, system: str | None, stream: bool) -> None:
    """The terminal chat (multi-turn, /clear, /system, /exit), or one answer per piped line."""
    out = sys.stdout
    if not sys.stdin.isatty():
        # Scripts: every line is an independent query; the answer follows it.
        for line in sys.stdin:
            query = line.strip()
            if not query:
                continue
            out.write(f"<<< {query}\n")
            answer = reply(chat_messages(system, [], query), out if stream else None)
            if not stream:
                out.write(answer + "\n")
            out.write("\n")
            out.flush()
        return
    history: list[dict[str, str]] = []
    print(HELP)
    while True:
        try:
            query = input("<<< ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if not query:
            continue
        if query in {"/exit", "/quit", "exit", "quit"}:
            return
        if query == "/clear":
            history = []
            print("(conversation cleared)")
            continue
        if query.startswith("/system"):
            system = query.removeprefix("/system").strip() or None
            history = []
            print(f"(system prompt: {system or 'the template default'}; conversation cleared)")
            continue
        try:
            answer = reply(chat_messages(system, history, query), out if stream else None)
        except KeyboardInterrupt:
            print("\n(interrupted)")
            continue
        if not stream:
            print(answer)
        history += [{"role": "user", "content": query}, {"role": "assistant", "content": answer}]
