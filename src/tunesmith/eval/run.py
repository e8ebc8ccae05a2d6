"""``tunesmith eval``: base and tuned model on the same items, greedy, one report.

Read top to bottom: check every input (datasets, metrics, checkpoint, output folder) before a
model is loaded; look the answers up in the cache; load the model once (the base answers are
generated with the adapter switched off) only when something is missing; score; write
``report.md``, ``report.json``, ``answers.jsonl`` and charts into one folder that appears only
when complete; print the summary table.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tunesmith.config import EvalArgs, InferCommandArgs, from_dict, to_dict
from tunesmith.data.self_cognition import parse_name_pair
from tunesmith.eval import llamacpp_eval
from tunesmith.eval.cache import AnswerCache, adapter_fingerprint, base_fingerprint, item_key
from tunesmith.eval.items import Item, load_items
from tunesmith.eval.metrics import check_installed
from tunesmith.eval.report import summary_table, write_report
from tunesmith.eval.score import (
    METRICS,
    Row,
    dataset_rows,
    moved,
    paired_change,
    score_answer,
)
from tunesmith.infer.batch import with_system
from tunesmith.infer.engine import (
    Engine,
    generate_batch,
    generate_tokens,
    generation_kwargs,
    load_engine,
)
from tunesmith.model.adapters import check_adapter, resolve_base
from tunesmith.model.load import resolve_dtype
from tunesmith.options import model_options
from tunesmith.utils import UserError, logger

# Eval answers are short and their prompts alike in length, so a batch wastes little on
# padding or on waiting for its longest answer: 16 on CPU too (infer's default there is 8).
EVAL_BATCH = 16
DEFAULT_DATASETS = EvalArgs().eval_dataset
SPEED_TOKENS = 24  # decode steps timed per model: enough for a stable mean, seconds on a CPU


@dataclass
class Model:
    """One of the models compared: the base, or base + adapter."""

    label: str
    """Its name in the table."""
    cache: AnswerCache
    """Its cached answers."""
    adapter: bool
    """Whether the adapter is on while it answers."""


def resolve_checkpoint(path: str) -> Path:
    """A checkpoint, or a run directory's best (``best_checkpoint.json``) or last checkpoint."""
    p = Path(path).expanduser()
    run_dir = p.is_dir() and not (p / "adapter_config.json").is_file()
    if run_dir and not (p / "best_checkpoint.json").is_file():
        ckpts = [c for c in p.glob("checkpoint-*") if c.name.split("-")[-1].isdigit()]
        ckpts = [c for c in ckpts if (c / "adapter_config.json").is_file()]
        if not ckpts:
            raise UserError(f"--adapters {path}: the run has no LoRA checkpoint yet")
        p = max(ckpts, key=lambda c: int(c.name.split("-")[-1]))
    return check_adapter(str(p))


def check_metrics(metrics: list[str]) -> None:
    """Every ``--metrics`` name is one tunesmith computes."""
    for m in metrics:
        if m not in METRICS:
            close = difflib.get_close_matches(m, METRICS, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise UserError(f"--metrics {m}: unknown metric (known: {', '.join(METRICS)}){hint}")


def output_dir(args: EvalArgs, ckpt: Path | None) -> Path:
    """``--eval_output_dir``, else RUN/eval beside the checkpoint, else eval_output/TIME;
    checked writable now, not after the answers are generated."""
    if args.eval_output_dir:
        out = Path(args.eval_output_dir).expanduser()
    elif ckpt is not None:
        out = ckpt.parent / "eval"
    else:
        out = Path("eval_output") / time.strftime("%Y%m%d-%H%M%S")
    parent = next((p for p in [out.parent, *out.parent.parents] if p.exists()), Path("."))
    if not os.access(parent, os.W_OK):
        raise UserError(f"--eval_output_dir {out}: cannot write there (permission denied)")
    return out


def identity_names(args: EvalArgs, recorded: dict[str, Any]) -> list[str]:
    """The names an identity answer must give: ``--model_name``/``--model_author``, else the
    run's; empty when neither has any."""
    try:
        name = parse_name_pair(args.model_name or recorded.get("model_name"), ("", ""))
        author = parse_name_pair(args.model_author or recorded.get("model_author"), ("", ""))
    except (ValueError, TypeError) as e:
        raise UserError(f"--model_name/--model_author: {e}") from None
    return list(dict.fromkeys(n for n in (*name, *author) if n))


@contextlib.contextmanager
def adapter_off(engine: Engine, off: bool) -> Iterator[None]:
    """Generate with the base weights alone: peft skips the LoRA layers inside the block."""
    from peft import PeftModel

    if off and isinstance(engine.model, PeftModel):
        with engine.model.disable_adapter():
            yield
    else:
        yield


def generate_missing(
    engine: Engine, model: Model, convs: list[list[dict[str, str]]], items: list[Item],
    args: EvalArgs, batch: int, progress: bool = True,
) -> None:  # fmt: skip
    """Answer the items ``model`` has no cached answer for, batch by batch, into its cache."""
    from tqdm import tqdm

    todo: dict[int, list[int]] = {}  # answer length -> items, so a batch shares its settings
    for i, it in enumerate(items):
        n = it.max_new_tokens or args.max_new_tokens
        if model.cache.get(item_key(convs[i], n)) is None:
            todo.setdefault(n, []).append(i)
    total = sum(map(len, todo.values()))
    if not total:
        return
    logger.info(f"{model.label}: generating {total} answers, {batch} at a time")
    infer = from_dict(InferCommandArgs, {"temperature": 0.0, "max_new_tokens": 1})
    with (
        adapter_off(engine, not model.adapter),
        tqdm(total=total, desc=model.label, disable=not progress) as bar,
    ):
        for n, idx in sorted(todo.items()):
            gen = generation_kwargs(infer, engine.tokenizer) | {"max_new_tokens": n}
            idx.sort(key=lambda i: -len(json.dumps(convs[i], ensure_ascii=False)))
            for start in range(0, len(idx), batch):
                part = idx[start : start + batch]
                out = generate_batch(engine, [convs[i] for i in part], gen)
                model.cache.put(
                    [(item_key(convs[i], n), a) for i, a in zip(part, out, strict=True)]
                )
                bar.update(len(part))


@torch.inference_mode()
def measure_speed(engine: Engine, model: Model, conv: list[dict[str, str]]) -> dict[str, float]:
    """Time to first token and mean per-token decode time (batch 1, greedy), in ms."""
    tok = engine.tokenizer
    text = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    enc = tok(text, return_tensors="pt", add_special_tokens=False).to(engine.device)
    infer = from_dict(InferCommandArgs, {"temperature": 0.0, "max_new_tokens": 1})
    gen = generation_kwargs(infer, tok)

    def timed(n: int) -> float:
        kw = gen | {"max_new_tokens": n, "min_new_tokens": n}
        start = time.perf_counter()
        generate_tokens(engine, enc["input_ids"], enc["attention_mask"], kw)
        return time.perf_counter() - start

    with adapter_off(engine, not model.adapter):
        timed(2)  # warm-up: first-call allocations are not the model's speed
        ttft = min(timed(1) for _ in range(2))
        total = timed(SPEED_TOKENS)
    per_token = max(total - ttft, 0.0) / (SPEED_TOKENS - 1)
    return {"ttft_ms": 1000 * ttft, "decode_ms_per_token": 1000 * per_token,
            "prompt_tokens": int(enc["input_ids"].shape[1])}  # fmt: skip


@dataclass
class Plan:
    """Everything checked before a model is loaded."""

    items: list[Item]
    """The questions, all datasets."""
    convs: list[list[dict[str, str]]]
    """Each item's conversation with the system prompt, as the models see it."""
    models: list[Model]
    """Base first, then the tuned model when there is an adapter."""
    infer_args: InferCommandArgs
    """How the engine loads (base + adapter)."""
    names: list[str]
    """The identity answers must give."""
    out: Path
    """The report folder."""
    meta: dict[str, Any]
    """What the report says about the setup."""
    backend: str = "pt"
    """What generates the answers: ``pt`` or ``llamacpp``."""


def plan(args: EvalArgs) -> Plan:
    """Check every input and find the models and their caches; loads no weights."""
    check_installed()
    check_metrics(args.metrics)
    if args.max_batch_size is not None and args.max_batch_size < 1:
        raise UserError(f"--max_batch_size must be at least 1, got {args.max_batch_size}")
    if len(args.adapters) > 1:
        raise UserError("tunesmith eval: pass one --adapters checkpoint or run directory")
    ckpt = resolve_checkpoint(args.adapters[0]) if args.adapters else None
    adapters = [str(ckpt)] if ckpt else []
    infer_args = from_dict(InferCommandArgs, to_dict(args) | {"adapters": adapters})
    base = resolve_base(model_options(infer_args), infer_args.adapters, infer_args.system)
    names = identity_names(args, base.recorded)
    datasets = list(args.eval_dataset)
    if "identity" in datasets and not names:
        if datasets != DEFAULT_DATASETS:
            raise UserError(
                "the identity probes need the model's name: pass --model_name (and "
                "--model_author), or leave identity out (--eval_dataset retention …)"
            )
        # A plain model (or a run without a new identity): nothing to check the answers against.
        logger.info("no --model_name: the identity probes are left out")
        datasets.remove("identity")
    items = load_items(datasets, args.eval_limit, args.use_hf)
    out = output_dir(args, ckpt)
    backend = llamacpp_eval.resolve_backend(args, infer_args)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = str(resolve_dtype(args.torch_dtype, device)).removeprefix("torch.")
    if backend == "llamacpp":
        dtype = f"gguf-{args.gguf_type}"
    # The key names the backend: llama.cpp's answers are never mixed with PyTorch's.
    base_key = base_fingerprint(base.model_dir, dtype, device + ("-llamacpp" if
                                backend == "llamacpp" else ""))  # fmt: skip
    use = args.eval_use_cache
    models = [Model(base.name, AnswerCache(base_key, use), adapter=False)]
    if ckpt is not None:
        tuned = AnswerCache(adapter_fingerprint(base_key, ckpt), use)
        models.append(Model(f"{ckpt.parent.name}/{ckpt.name}", tuned, adapter=True))
    convs = [with_system(it.messages, base.system) for it in items]
    meta = {
        "base_model": base.name, "model_dir": str(base.model_dir), "adapters": adapters[0]
        if adapters else None, "system": base.system, "identity": names,
        "base_identity": list(args.base_identity), "device": device, "dtype": dtype,
        "backend": backend,
    }  # fmt: skip
    return Plan(items, convs, models, infer_args, names, out, meta, backend)


def _length(args: EvalArgs, item: Item) -> int:
    return item.max_new_tokens or args.max_new_tokens


def collect(
    p: Plan, args: EvalArgs, progress: bool = True
) -> tuple[dict[str, list[str]], dict[str, dict[str, float]]]:
    """Every model's answer to every item, and its speed: from the cache, generating only what
    is missing (the model is loaded once, and only then; ``progress``: the bars)."""
    engine = None
    speed: dict[str, dict[str, float]] = {}
    for m in p.models:
        cached = m.cache.speed() if args.eval_speed else None
        keys = [item_key(c, _length(args, it)) for c, it in zip(p.convs, p.items, strict=True)]
        missing = any(m.cache.get(k) is None for k in keys)
        if p.backend == "llamacpp" and (missing or (args.eval_speed and cached is None)):
            lengths = [_length(args, it) for it in p.items]
            margs = llamacpp_eval.model_args(p.infer_args, Path(p.meta["model_dir"]), m.adapter)
            batch = args.max_batch_size or EVAL_BATCH
            measured = llamacpp_eval.fill(margs, m.label, m.cache, p.convs, lengths, batch,
                                          args.eval_speed and cached is None)  # fmt: skip
            cached = cached or measured
            p.meta["generated"] = True
        elif missing or (args.eval_speed and cached is None):
            if engine is None:
                engine = load_engine(p.infer_args)
            batch = args.max_batch_size or EVAL_BATCH
            generate_missing(engine, m, p.convs, p.items, args, batch, progress)
            if args.eval_speed and cached is None:
                cached = measure_speed(engine, m, p.convs[0])
                m.cache.put_speed(cached)
        if cached is not None:
            speed[m.label] = cached
    p.meta["generated"] = engine is not None or p.meta.get("generated", False)
    answers = {
        m.label: [m.cache.get(item_key(c, _length(args, it))) or ""
                  for c, it in zip(p.convs, p.items, strict=True)]
        for m in p.models
    }  # fmt: skip
    return answers, speed


def summarize(
    p: Plan, answers: dict[str, list[str]], metrics: list[str]
) -> tuple[dict[str, list[dict[str, Any]]], list[Row], dict[str, float] | None]:
    """Score every answer; the table rows; how far the tuned answers moved (retention items,
    or all items without retention), None with one model."""
    base_identity = p.meta["base_identity"]
    scores = {
        label: [score_answer(it, a, p.names, base_identity)
                for it, a in zip(p.items, ans, strict=True)]
        for label, ans in answers.items()
    }  # fmt: skip
    rows: list[Row] = []
    for name in dict.fromkeys(it.dataset for it in p.items):
        idx = [i for i, it in enumerate(p.items) if it.dataset == name]
        for m in p.models:
            pick = [p.items[i] for i in idx]
            rows += dataset_rows(m.label, name, pick, [scores[m.label][i] for i in idx],
                                 [answers[m.label][i] for i in idx], metrics)  # fmt: skip
    drift = None
    if len(p.models) == 2:
        b, t = answers[p.models[0].label], answers[p.models[1].label]
        ret = [i for i, it in enumerate(p.items) if it.dataset == "retention"]
        drift = moved([b[i] for i in ret], [t[i] for i in ret]) if ret else moved(b, t)
        if ret:
            sb, st = scores[p.models[0].label], scores[p.models[1].label]
            drift |= paired_change([sb[i] for i in ret], [st[i] for i in ret])
    return scores, rows, drift


def evaluate(args: EvalArgs, progress: bool = True, echo: Callable[[str], object] = print) -> Path:
    """Run ``tunesmith eval``: score, write the report folder, print the table (each line
    through ``echo``: the Python API keeps them); its path."""
    started = time.perf_counter()
    p = plan(args)
    answers, speed = collect(p, args, progress)
    scores, rows, drift = summarize(p, answers, args.metrics)
    wall = time.perf_counter() - started
    p.meta |= {
        "wall_s": round(wall, 1),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "cpu_threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    labels = [m.label for m in p.models]
    write_report(p.out, p.meta, labels, p.items, p.convs, answers, scores, rows, speed, drift)
    echo(summary_table(rows))
    for label, s in speed.items():
        echo(f"speed {label}: time to first token {s['ttft_ms']:.0f} ms, "
             f"decode {s['decode_ms_per_token']:.1f} ms/token")  # fmt: skip
    if drift is not None:
        echo(f"retention answers changed by tuning: {drift['changed_pct']:.0f}%, "
             f"ROUGE-L to the base answers {drift['rouge-l_to_base']:.1f}")  # fmt: skip
    echo(f"eval wall time {wall:.1f} s (load average {p.meta['load_avg_1m']}); "
         f"report: {p.out / 'report.md'}")  # fmt: skip
    return p.out
