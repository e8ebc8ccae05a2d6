"""tunesmith from Python: every command as a plain function, for notebooks and scripts.

Each function takes the command's flag names as keyword arguments (``sft(model=...,
dataset=[...], max_steps=10)``), builds the same flag dataclass the CLI builds (same
defaults, same checks, same one-sentence ``UserError`` messages) and runs the same code the
CLI runs; ``cli.py`` is a thin layer over these functions. Nothing here exits the process or
sets up logging: call ``tunesmith.utils.setup_logging()`` to see the log lines.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import queue
import threading
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunesmith.config import DataCommandArgs, ExportArgs, InferCommandArgs, SftArgs
from tunesmith.utils import Interrupted, UserError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "DataReport",
    "Interrupted",
    "Run",
    "UserError",
    "data",
    "export",
    "infer",
    "infer_stream",
    "load",
    "sft",
]

TRUE = {"true", "1", "yes", "y", "on"}
FALSE = {"false", "0", "no", "n", "off"}


def str2bool(value: str | bool) -> bool:
    """Parse ms-swift style booleans: ``true``/``false`` (also 1/0, yes/no)."""
    if isinstance(value, bool):
        return value
    low = str(value).strip().lower()
    if low in TRUE:
        return True
    if low in FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def unwrap(tp: Any) -> tuple[Any, bool]:
    """``int | None`` -> (int, True); ``list[str]`` -> (list[str], False)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return inner[0], True
    return tp, False


def flag_names(cls: type) -> list[str]:
    """Every flag name of ``cls``, aliases included (without the dashes)."""
    names = []
    for f in dataclasses.fields(cls):
        names.append(f.name)
        names.extend(f.metadata.get("aliases", ()))
    return names


def nearest(name: str, cls: type) -> str:
    """``"; did you mean --flag?"`` for the flag of ``cls`` closest to ``name`` ("" if none)."""
    close = difflib.get_close_matches(name.lstrip("-"), flag_names(cls), n=1, cutoff=0.5)
    return f"; did you mean --{close[0]}?" if close else ""


def coerce(cls: type, values: dict[str, Any], source: str) -> dict[str, Any]:
    """Convert ``--config`` YAML values or keyword arguments (strings or scalars) to the
    fields' types, and check choices; ``source`` starts each error message."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out = {}
    for key, value in values.items():
        tp, optional = unwrap(hints[key])
        try:
            if value is None and optional:
                out[key] = None
            elif typing.get_origin(tp) is list:
                out[key] = (
                    [str(v) for v in value] if isinstance(value, list) else str(value).split()
                )
            elif tp is bool:
                out[key] = str2bool(value)
            elif tp is int and (
                isinstance(value, bool) or (isinstance(value, float) and not value.is_integer())
            ):
                raise ValueError(f"expected a whole number, got {value!r}")
            else:
                out[key] = tp(value)
        except (ValueError, TypeError, argparse.ArgumentTypeError) as e:
            raise UserError(f"{source}: {key}: {e}") from None
        choices = fields[key].metadata.get("choices")
        if choices and out[key] not in choices:
            raise UserError(f"{source}: {key}: expected one of {', '.join(choices)}")
    return out


def check_todo(args: Any, cls: type) -> None:
    """Refuse flags that are accepted for compatibility but not implemented yet."""
    for f in dataclasses.fields(cls):
        todo = f.metadata.get("todo")
        if not todo:
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        value = getattr(args, f.name)
        if value != default:
            raise UserError(
                f"--{f.name} is not implemented yet in this version of tunesmith (planned: "
                f"{todo}); remove it to continue"
            )


def make_args(cls: type, prog: str, values: dict[str, Any]) -> Any:
    """``cls`` from keyword arguments named like the flags (aliases too), converted and
    checked as a ``--config`` file is: unknown names, types, choices, not-yet-implemented."""
    aliases = {a: f.name for f in dataclasses.fields(cls) for a in f.metadata.get("aliases", ())}
    valid = {f.name for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    named: dict[str, Any] = {}
    for key, value in values.items():
        name = aliases.get(key, key)
        if name not in valid:
            raise UserError(f"{prog}: unknown argument '--{key}'{nearest(key, cls)}")
        if typing.get_origin(unwrap(hints[name])[0]) is list:
            # One path is one item (a YAML string is split on spaces; a Python one is not).
            if isinstance(value, str | os.PathLike):
                value = [value]
            elif isinstance(value, tuple):
                value = list(value)
        named[name] = value
    args = cls(**coerce(cls, named, prog))
    check_todo(args, cls)
    return args


@dataclass
class Run:
    """A finished ``sft`` run, as a program sees it."""

    run_dir: Path
    """The run directory (``OUTPUT_DIR/vN-…``): args.json, logging.jsonl, checkpoints."""
    last_checkpoint: Path | None
    """The newest checkpoint (``run_dir/checkpoint-N``)."""
    best_checkpoint: Path | None
    """The checkpoint with the best validation metric (None without validation data)."""
    metrics: dict[str, float] = field(default_factory=dict)
    """The last logged value of every metric (loss, lr, eval_loss, …)."""
    history: list[dict[str, Any]] = field(default_factory=list)
    """Every ``logging.jsonl`` record, oldest first (train lines and eval lines)."""


def read_run(run_dir: Path) -> Run:
    """A ``Run`` from what a run directory holds on disk."""
    import json

    from tunesmith.model.adapters import list_checkpoints, run_args
    from tunesmith.train.track import BestTracker, read_log

    run_dir = Path(run_dir)
    ckpts = list_checkpoints(run_dir)
    log = run_dir / "logging.jsonl"
    history = read_log(log) if log.is_file() else []
    metrics: dict[str, float] = {}
    for record in history:
        metrics.update({k: v for k, v in record.items() if k != "step"})
    # The best checkpoint as training picked it: the same tracker over the logged evaluations.
    tracker = BestTracker(run_args(run_dir).get("metric_for_best_model", "loss"), None)
    for record in history:
        if tracker.key in record:
            tracker.update(record, record["step"])
    best = run_dir / f"checkpoint-{tracker.best_step}" if tracker.best_step is not None else None
    if (run_dir / "best_checkpoint.json").is_file():
        state = json.loads((run_dir / "best_checkpoint.json").read_text(encoding="utf-8"))
        best = Path(state["best_model_checkpoint"])
    if best is not None and not best.is_dir():
        best = None  # that step was not saved (or rotated away)
    return Run(run_dir, ckpts[-1] if ckpts else None, best, metrics, history)


def sft(*, progress: bool = True, **flags: Any) -> Run:
    """Fine-tune a chat model, as ``tunesmith sft``; returns the finished ``Run``.

    ``flags`` are the flags of ``tunesmith sft --help`` (``model``, ``dataset``,
    ``max_steps``, …) with the same defaults; ``progress=False`` hides the progress bar.
    Raises ``UserError`` for bad input and ``Interrupted`` when stopped by a signal.
    """
    from tunesmith.train.sft import sft as train

    args = make_args(SftArgs, "tunesmith sft", flags)
    return read_run(train(args, progress=progress))


def _backend(flags: dict[str, Any]) -> tuple[Any, Any]:
    """(engine, reply) of ``tunesmith infer``'s backend for these flags."""
    from tunesmith.infer.chat import load_backend

    args = make_args(InferCommandArgs, "tunesmith infer", flags)
    if args.val_dataset:
        raise UserError("tunesmith infer: pass val_dataset to infer() without queries")
    engine, reply, _ = load_backend(args)
    return engine, reply


def infer(
    queries: list[str] | None = None, *, progress: bool = True, **flags: Any
) -> list[str] | Path:
    """Answer each of ``queries`` (one independent conversation each) with a model or a
    checkpoint, as ``tunesmith infer``; returns the answers in order.

    ``flags`` are those of ``tunesmith infer --help`` (``adapters``, ``model``,
    ``max_new_tokens``, ``temperature``, …). Without ``queries``, ``val_dataset=[...]`` runs
    batch inference and returns the written ``result_path`` (``progress=False``: no bar).
    """
    from tunesmith.infer.engine import chat_messages

    if queries is None:
        from tunesmith.infer.chat import infer as run_infer

        args = make_args(InferCommandArgs, "tunesmith infer", flags)
        if not args.val_dataset:
            raise UserError("tunesmith infer: pass queries=[...] or val_dataset=[...]")
        return run_infer(args, progress)
    if isinstance(queries, str):
        queries = [queries]
    engine, reply = _backend(flags)
    return [reply(chat_messages(engine.system, [], q), None) for q in queries]


class _QueueWriter:
    """A text stream whose writes go to a queue (the streamer writes, the iterator reads)."""

    def __init__(self, q: queue.Queue[Any]) -> None:
        self.q = q

    def write(self, text: str) -> int:
        self.q.put(text)
        return len(text)

    def flush(self) -> None:
        pass


def infer_stream(query: str, **flags: Any) -> Iterator[str]:
    """Answer ``query`` piece by piece as it is generated (``infer``'s flags); the pieces
    joined are the answer, plus a final newline."""
    engine, reply = _backend(flags)
    from tunesmith.infer.engine import chat_messages

    pieces: queue.Queue[Any] = queue.Queue()
    done = object()
    failed: list[BaseException] = []

    def work() -> None:
        try:
            reply(chat_messages(engine.system, [], query), _QueueWriter(pieces))
        except BaseException as e:  # re-raised in the caller's thread
            failed.append(e)
        finally:
            pieces.put(done)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    while (piece := pieces.get()) is not done:
        yield piece
    thread.join()
    if failed:
        raise failed[0]


@dataclass
class DataReport:
    """What ``tunesmith data`` found in a dataset, as numbers and as the printed text."""

    text: str
    """The report ``tunesmith data`` prints (trained tokens ``[[bracketed]]`` by default)."""
    train_samples: int
    """Training samples after tokenization (too-long or loss-free ones dropped)."""
    val_samples: int
    """Validation samples."""
    lengths: list[int]
    """Tokens of each training sample."""
    trained_tokens: int
    """Training tokens that carry loss."""
    by_source: dict[str, dict[str, int]]
    """--dataset value -> the records and tokens it contributed."""
    dropped: dict[str, int]
    """Samples deleted or truncated for --max_length, and dropped with nothing to learn."""
    notes: list[str]
    """Remarks such as skipped bad records (``strict=False``)."""


def data(**flags: Any) -> DataReport:
    """Check a dataset as ``tunesmith data`` does (its flags: ``dataset``, ``model``,
    ``max_length``, …); returns the statistics and the printed report. ``color`` defaults to
    ``never`` here (``always`` for terminal colours)."""
    from tunesmith.train.data_check import check_data, data_command

    flags.setdefault("color", "never")
    args = make_args(DataCommandArgs, "tunesmith data", flags)
    tokenizer, prepared = check_data(args)
    st = prepared.stats
    return DataReport(
        text=data_command(args, (tokenizer, prepared)),
        train_samples=len(prepared.train),
        val_samples=len(prepared.val),
        lengths=[len(s.input_ids) for s in prepared.train],
        trained_tokens=sum(s.n_trained for s in prepared.train),
        by_source=prepared.by_source,
        dropped={"deleted": st.deleted, "truncated": st.truncated, "no_labels": st.no_labels},
        notes=list(prepared.notes),
    )


def export(**flags: Any) -> Path:
    """Merge adapters into their base, or write GGUF / Ollama, as ``tunesmith export``;
    returns the written path."""
    from tunesmith.export.convert import export as run_export

    return run_export(make_args(ExportArgs, "tunesmith export", flags))


def load(
    checkpoint_or_run_dir: str | Path, merge: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``(model, tokenizer)`` of a checkpoint, ready for transformers (``pipeline(
    "text-generation", model=model, tokenizer=tokenizer)``).

    A run directory stands for its best checkpoint (``load_best_model_at_end``) or else its
    newest one. The base model and dtype come from the run's ``args.json``; ``merge`` folds
    the LoRA adapter into the weights (a plain transformers model, faster to run).
    """
    import torch

    from tunesmith.model.adapters import (
        list_checkpoints,
        load_adapted,
        merged,
        resolve_base,
        run_args,
    )
    from tunesmith.model.load import load_model, load_tokenizer, resolve_dtype
    from tunesmith.options import ModelOptions

    path = Path(checkpoint_or_run_dir).expanduser()
    if not path.exists():
        raise UserError(f"tunesmith.load: {path}: no such directory")
    if not (path / "best_checkpoint.json").is_file() and not (path / "config.json").is_file():
        ckpts = list_checkpoints(path) if path.is_dir() else []
        if ckpts and not (path / "adapter_config.json").is_file():
            path = ckpts[-1]
    recorded = run_args(path)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_dtype(recorded.get("torch_dtype", "auto"), device.type)
    attn = recorded.get("attn_impl", "sdpa")
    if (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
        # A --train_type full checkpoint is a whole model directory.
        return load_model(path, dtype, attn, device=device), load_tokenizer(path)
    base = resolve_base(ModelOptions(), [str(path)])
    model, tokenizer = load_adapted(base, dtype, device, attn, quantized=not merge)
    return (merged(model) if merge else model), tokenizer
