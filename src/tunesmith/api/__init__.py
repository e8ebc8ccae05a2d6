"""tunesmith from Python: every command as a plain function, for notebooks and scripts.

Each function takes the command's flag names as keyword arguments (``sft(model=...,
dataset=[...], max_steps=10)``), builds the same flag dataclass the CLI builds (same
defaults, same checks, same one-sentence ``UserError`` messages) and runs the same code the
CLI runs; ``cli.py`` is a thin layer over the same steps. The flags show up typed: at run time
through each function's ``__signature__`` (``help``, ``inspect.signature``, Jupyter), for
static tools through ``**flags: Unpack[SftFlags]`` (``api/typed.py``, generated from
``tunesmith.config``). Nothing here exits the process or sets up logging: call
``tunesmith.utils.setup_logging()`` to see the log lines. ``progress=False`` hides every
progress bar of the call (tunesmith's, and transformers' weight loading).

``import tunesmith`` exposes the same functions at the top level (``tunesmith.sft``,
``tunesmith.infer``, …).
"""

from __future__ import annotations

import queue
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunesmith.api.flags import bars, make_args, takes
from tunesmith.api.results import (
    DataReport,
    Deployment,
    EvalReport,
    Run,
    read_eval,
    read_run,
)
from tunesmith.config import (
    DataCommandArgs,
    DeployArgs,
    EvalArgs,
    ExportArgs,
    InferCommandArgs,
    SftArgs,
)
from tunesmith.utils import Interrupted, UserError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from tunesmith.api.typed import (
        DataFlags,
        DeployFlags,
        EvalFlags,
        ExportFlags,
        InferFlags,
        SftFlags,
    )

    if sys.version_info >= (3, 11):
        from typing import Unpack
    else:
        from typing_extensions import Unpack

__all__ = [
    "DataReport",
    "Deployment",
    "EvalReport",
    "Interrupted",
    "Run",
    "UserError",
    "data",
    "deploy",
    "eval",
    "export",
    "infer",
    "infer_stream",
    "load",
    "sft",
]


@takes(SftArgs)
def sft(*, progress: bool = True, **flags: Unpack[SftFlags]) -> Run:
    """Fine-tune a chat model, as ``tunesmith sft``; returns the finished ``Run`` (run dir,
    last and best checkpoint, final metrics, the logged history).

    The flags are those of ``tunesmith sft --help``, with the same defaults. Raises
    ``UserError`` for bad input and ``Interrupted`` when stopped by a signal (after saving).
    """
    from tunesmith.eval.base_answers import expand_base_answers
    from tunesmith.train.sft import sft as train

    args = make_args(SftArgs, "tunesmith sft", dict(flags))
    with bars(progress):
        # `--dataset base-answers` names the base model's own answers, generated once (as the CLI)
        args = expand_base_answers(args)
        return read_run(train(args, progress=progress))


def _backend(flags: dict[str, Any]) -> tuple[Any, Any]:
    """(engine, reply) of ``tunesmith infer``'s backend for these flags."""
    from tunesmith.infer.chat import load_backend

    args = make_args(InferCommandArgs, "tunesmith infer", flags)
    if args.val_dataset:
        raise UserError("tunesmith infer: pass val_dataset to infer() without queries")
    engine, reply, _ = load_backend(args)
    return engine, reply


@takes(InferCommandArgs)
def infer(
    queries: str | list[str] | None = None,
    *,
    progress: bool = True,
    **flags: Unpack[InferFlags],
) -> list[str] | Path:
    """Answer each of ``queries`` (one independent conversation each) with a model or a
    checkpoint, as ``tunesmith infer``; returns the answers in order.

    Without ``queries``, ``val_dataset=[...]`` runs batch inference and returns the written
    ``result_path``.
    """
    if queries is None:
        from tunesmith.infer.chat import infer as run_infer

        args = make_args(InferCommandArgs, "tunesmith infer", dict(flags))
        if not args.val_dataset:
            raise UserError("tunesmith infer: pass queries=[...] or val_dataset=[...]")
        with bars(progress):
            result = run_infer(args, progress)
        assert result is not None  # batch inference always writes its file
        return result
    from tunesmith.infer.engine import chat_messages

    if isinstance(queries, str):
        queries = [queries]
    with bars(progress):
        engine, reply = _backend(dict(flags))
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


@takes(InferCommandArgs)
def infer_stream(
    query: str, *, progress: bool = True, **flags: Unpack[InferFlags]
) -> Iterator[str]:
    """Answer ``query`` piece by piece as it is generated (``infer``'s flags); the pieces
    joined are the answer, plus a final newline."""
    with bars(progress):
        engine, reply = _backend(dict(flags))
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


@takes(DataCommandArgs)
def data(*, progress: bool = True, **flags: Unpack[DataFlags]) -> DataReport:
    """Check a dataset as ``tunesmith data`` does; returns the statistics and the printed
    report. ``color`` defaults to ``never`` here (``always`` for terminal colours)."""
    from tunesmith.train.data_check import check_data, data_command

    values: dict[str, Any] = {"color": "never", **flags}
    args = make_args(DataCommandArgs, "tunesmith data", values)
    with bars(progress):
        tokenizer, prepared = check_data(args, progress)
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


@takes(EvalArgs)
def eval(*, progress: bool = True, **flags: Unpack[EvalFlags]) -> EvalReport:
    """Score the base model and the tuned one on the same questions, as ``tunesmith eval``:
    identity probes, the retention set, your datasets. Returns the report as data (table
    rows, every answer, speeds) with the paths of ``report.md`` / ``report.json``; prints
    nothing (``.text`` is what the CLI prints)."""
    from tunesmith.eval.run import evaluate

    args = make_args(EvalArgs, "tunesmith eval", dict(flags))
    printed: list[str] = []
    with bars(progress):
        folder = evaluate(args, progress=progress, echo=printed.append)
    return read_eval(folder, "\n".join(printed))


@takes(ExportArgs)
def export(*, progress: bool = True, **flags: Unpack[ExportFlags]) -> Path:
    """Merge adapters into their base, or write GGUF / Ollama, as ``tunesmith export``;
    returns the written path (a model folder, a ``.gguf`` file or an Ollama folder)."""
    from tunesmith.export.convert import export as run_export

    args = make_args(ExportArgs, "tunesmith export", dict(flags))
    with bars(progress):
        return run_export(args)


@takes(DeployArgs)
def deploy(*, progress: bool = True, **flags: Unpack[DeployFlags]) -> Deployment:
    """Start ``tunesmith deploy``'s OpenAI-compatible server (and chat page) on a background
    thread and return at once, the model loaded; ``.stop()`` ends it, ``.wait()`` blocks
    until Ctrl-C as the CLI does. ``port=0`` picks a free port (``.base_url`` names it).

    From the same notebook: ``OpenAI(base_url=d.base_url, api_key=d.api_key or "none")``.
    """
    from tunesmith.serve.deploy import serve_in_thread

    args = make_args(DeployArgs, "tunesmith deploy", dict(flags))
    with bars(progress):
        running = serve_in_thread(args)
    if not running.uvicorn.started:  # uvicorn logged why; nothing may be left running
        running.close()
        raise UserError(f"tunesmith deploy: the server did not start on port {args.port}")
    server = running.server
    return Deployment(url=running.url, base_url=f"{running.url}/v1",
                      models=server.catalog.names(), api_key=server.api_key,
                      running=running)  # fmt: skip


def load(
    checkpoint_or_run_dir: str | Path, merge: bool = False, *, progress: bool = True
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``(model, tokenizer)`` of a checkpoint, ready for transformers (``pipeline(
    "text-generation", model=model, tokenizer=tokenizer)``).

    A run directory stands for its best checkpoint (``load_best_model_at_end``) or else its
    newest one. The base model and dtype come from the run's ``args.json``; ``merge`` folds
    the LoRA adapter into the weights (a plain transformers model, faster to run).
    """
    import torch

    from tunesmith.model.adapters import list_checkpoints, load_adapted, merged, resolve_base
    from tunesmith.model.adapters import run_args as recorded_args
    from tunesmith.model.load import load_model, load_tokenizer, resolve_dtype
    from tunesmith.options import ModelOptions

    path = Path(checkpoint_or_run_dir).expanduser()
    if not path.exists():
        raise UserError(f"tunesmith.load: {path}: no such directory")
    if not (path / "best_checkpoint.json").is_file() and not (path / "config.json").is_file():
        ckpts = list_checkpoints(path) if path.is_dir() else []
        if ckpts and not (path / "adapter_config.json").is_file():
            path = ckpts[-1]
    recorded = recorded_args(path)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_dtype(recorded.get("torch_dtype", "auto"), device.type)
    attn = recorded.get("attn_impl", "sdpa")
    with bars(progress):
        if (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
            # A --train_type full checkpoint is a whole model directory.
            return load_model(path, dtype, attn, device=device), load_tokenizer(path)
        base = resolve_base(ModelOptions(), [str(path)])
        model, tokenizer = load_adapted(base, dtype, device, attn, quantized=not merge)
    return (merged(model) if merge else model), tokenizer
