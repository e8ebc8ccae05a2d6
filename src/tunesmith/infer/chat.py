"""``tunesmith infer``: an interactive multi-turn chat, one answer per piped line, or (with
``--val_dataset``) batch inference over data files."""

from __future__ import annotations

import sys

import torch

from tunesmith.config import InferCommandArgs
from tunesmith.infer.engine import chat_messages, generate, generation_kwargs, load_engine

HELP = "commands: /clear (forget the conversation), /system TEXT (new system prompt), /exit"


def infer(args: InferCommandArgs) -> None:
    """Chat in the terminal, answer each line of piped stdin, or answer ``--val_dataset``."""
    prompts = None
    if args.val_dataset:  # bad data is reported before the slow model load
        from tunesmith.infer.batch import infer_dataset, load_prompts

        prompts = load_prompts(args.val_dataset, args.use_hf, args.seed)
    engine = load_engine(args)
    if args.merge_lora and args.adapters:
        from tunesmith.export.merge import merge_and_save, merged_dir
        from tunesmith.infer.engine import check_adapter

        merge_and_save(engine, merged_dir(check_adapter(args.adapters[-1]), None))
    gen = generation_kwargs(args, engine.tokenizer)
    torch.manual_seed(args.seed)
    if prompts is not None:
        infer_dataset(engine, args, gen, prompts)
        return
    out = sys.stdout
    if not sys.stdin.isatty():
        # Scripts: every line is an independent query; the answer follows it.
        for line in sys.stdin:
            query = line.strip()
            if not query:
                continue
            out.write(f"<<< {query}\n")
            answer = generate(
                engine, chat_messages(engine.system, [], query), gen, out if args.stream else None
            )
            if not args.stream:
                out.write(answer + "\n")
            out.write("\n")
            out.flush()
        return
    system = engine.system
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
            answer = generate(
                engine, chat_messages(system, history, query), gen, out if args.stream else None
            )
        except KeyboardInterrupt:
            print("\n(interrupted)")
            continue
        if not args.stream:
            print(answer)
        history += [{"role": "user", "content": query}, {"role": "assistant", "content": answer}]
