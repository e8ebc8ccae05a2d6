"""``--dataset base-answers``: the base model's own answers to general questions, to train on.

A LoRA trained only on self-cognition records learns that every answer is about itself ("编程
语言是一种由小智开发的人工智能助手"), and ``tunesmith eval``'s retention score drops. Seed 003
mixes general data into the identity data; offline, the base model's own greedy answers to a
builtin prompt set (``data/builtin/general_prompts.jsonl``, 40 zh + en prompts disjoint from
both eval sets) serve: training on them asks the model to keep answering as it did.

The answers are generated once per base model, system prompt and prompt set, and cached under
``$TUNESMITH_CACHE/base_answers/``; the ``--dataset`` value is replaced by that file (``#N``
kept), so the data layer reads an ordinary JSON Lines file. This runs before training starts,
on llama.cpp when it is installed (several times faster on a CPU), else on PyTorch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from importlib import resources
from pathlib import Path

from tunesmith.config import DataCommandArgs, InferCommandArgs, SftArgs, from_dict, to_dict
from tunesmith.data.sources import split_spec
from tunesmith.utils import cache_dir, logger, write_jsonl

NAMES = ("base-answers", "base_answers")
MAX_NEW_TOKENS = 128  # long enough for most answers to end by themselves
VERSION = 1  # bump when the generation settings change


def prompts() -> list[dict[str, str]]:
    """The builtin general prompts (``query`` and ``lang``)."""
    text = resources.files("tunesmith.data.builtin").joinpath("general_prompts.jsonl")
    return [json.loads(line) for line in text.read_text(encoding="utf-8").splitlines() if line]


def answers_path(model_dir: Path, system: str | None, backend: str) -> Path:
    """Where the answers of this base model (folder fingerprint), system prompt and backend
    are cached."""
    from tunesmith.model.gguf_cache import dir_fingerprint

    key = json.dumps([VERSION, dir_fingerprint(model_dir), system, backend, MAX_NEW_TOKENS,
                      prompts()], ensure_ascii=False)  # fmt: skip
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]
    return cache_dir() / "base_answers" / f"{model_dir.name}-{digest}.jsonl"


def generate(args: InferCommandArgs, backend: str, convs: list[list[dict[str, str]]]) -> list[str]:
    """Greedy answers to ``convs`` by the base model of ``args`` on ``backend``."""
    if backend == "llamacpp":
        from tunesmith.infer.llamacpp_backend import GenOptions, load_llamacpp
        from tunesmith.infer.llamacpp_batch import generate_parallel

        engine = load_llamacpp(args)
        try:
            gen = GenOptions(max_new_tokens=MAX_NEW_TOKENS, temperature=0.0)
            return generate_parallel(engine, convs, gen, parallel=16)
        finally:
            engine.llm.close()
    from tunesmith.infer.batch import answer_all
    from tunesmith.infer.engine import generation_kwargs, load_engine

    engine = load_engine(args)
    gen = generation_kwargs(args, engine.tokenizer) | {"max_new_tokens": MAX_NEW_TOKENS}
    return answer_all(engine, convs, gen, batch_size=8)


def base_answers_file(args: SftArgs | DataCommandArgs) -> Path:
    """The cached file of the base model's answers for ``args`` (generated when missing)."""
    from tunesmith.infer.llamacpp_backend import choose_backend
    from tunesmith.model.load import resolve_model

    model_dir = resolve_model(args.model, args.use_hf)
    infer = from_dict(InferCommandArgs, to_dict(args) | {"model": str(model_dir), "adapters": [],
                                                         "temperature": 0.0})  # fmt: skip
    backend = choose_backend(infer)
    path = answers_path(model_dir, args.system, backend)
    if path.is_file():
        logger.info(f"--dataset base-answers: the base model's answers from {path}")
        return path
    items = prompts()
    convs = [[{"role": "user", "content": p["query"]}] for p in items]
    if args.system:
        convs = [[{"role": "system", "content": args.system}, *c] for c in convs]
    logger.info(f"--dataset base-answers: the base model answers {len(items)} general prompts "
                f"once ({backend}); cached in {path}")  # fmt: skip
    out = generate(infer, backend, convs)
    write_jsonl(path, [{"query": p["query"], "response": a.strip(), "lang": p["lang"]}
                       for p, a in zip(items, out, strict=True)])  # fmt: skip
    return path


def expand_base_answers(args: SftArgs | DataCommandArgs) -> SftArgs | DataCommandArgs:
    """``args`` with every ``base-answers[#N]`` in ``--dataset`` replaced by the cached file of
    the base model's answers (``#N`` kept); unchanged when there is none. sft's
    ``--retain_dataset`` names it the same way, so it is replaced there too."""
    specs = [(s, *split_spec(s)) for s in args.dataset]
    if not any(name in NAMES for _s, name, _n in specs):
        return args
    path = str(base_answers_file(args))

    def expand(values: list[str]) -> list[str]:
        return [(path if n is None else f"{path}#{n}") if name in NAMES else s
                for s, name, n in ((s, *split_spec(s)) for s in values)]  # fmt: skip

    if isinstance(args, SftArgs):
        return dataclasses.replace(
            args, dataset=expand(args.dataset), retain_dataset=expand(args.retain_dataset)
        )
    return dataclasses.replace(args, dataset=expand(args.dataset))
