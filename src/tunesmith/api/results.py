"""What the API functions return: a finished run, a dataset report, an eval report, a running
server; each read from what the command wrote, so the CLI and Python see the same results."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tunesmith.eval.score import Row


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


@dataclass
class EvalReport:
    """What ``tunesmith eval`` scored and wrote, as data (read back from its report folder)."""

    rows: list[Row]
    """ms-swift's summary table, one row per model, dataset, metric and subset (0–100)."""
    table: str
    """That table as text (Markdown), as the CLI prints it."""
    text: str
    """Everything ``tunesmith eval`` prints: the table, speeds, how far the answers moved."""
    answers: list[dict[str, Any]]
    """Every answer with its scores (``answers.jsonl``: model, dataset, id, messages,
    response, labels, score, …)."""
    speed: dict[str, dict[str, float]]
    """Per model: time to first token and decode time per token, in ms."""
    moved: dict[str, float] | None
    """How far tuning moved the answers (changed_pct, rouge-l_to_base); None with one model."""
    meta: dict[str, Any]
    """The setup: base model, adapter, system prompt, identity names, device, dtype, time."""
    report_dir: Path
    """The report folder (``RUN/eval`` by default)."""
    report_md: Path
    """The human-readable report (``report.md``, charts beside it)."""
    report_json: Path
    """Every figure (``report.json``)."""


def read_eval(folder: Path, text: str) -> EvalReport:
    """An ``EvalReport`` from a finished report folder and the printed ``text``."""
    from tunesmith.eval.report import summary_table
    from tunesmith.eval.score import Row

    report = json.loads((folder / "report.json").read_text(encoding="utf-8"))
    rows = [Row(**r) for r in report["summary"]]
    lines = (folder / "answers.jsonl").read_text(encoding="utf-8").splitlines()
    return EvalReport(
        rows=rows, table=summary_table(rows), text=text,
        answers=[json.loads(line) for line in lines if line.strip()],
        speed=report["speed"], moved=report["moved"], meta=report["meta"], report_dir=folder,
        report_md=folder / "report.md", report_json=folder / "report.json",
    )  # fmt: skip


@dataclass
class Deployment:
    """A ``tunesmith deploy`` server running on a background thread of this process.

    ``OpenAI(base_url=d.base_url, api_key=d.api_key or "none")`` talks to it; ``stop()`` (or
    leaving a ``with`` block) shuts it down; ``wait()`` serves until Ctrl-C, as the CLI does.
    """

    url: str
    """``http://HOST:PORT``: the chat page."""
    base_url: str
    """``http://HOST:PORT/v1``: the OpenAI-compatible API."""
    models: list[str]
    """The names a request's ``model`` may pick: the base model, then the adapters."""
    api_key: str | None
    """The key every ``/v1`` request must send (None: none needed)."""
    running: Any = field(repr=False)
    """The server internals (``serve.deploy.Running``)."""
    _stopped: threading.Event = field(default_factory=threading.Event, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def stop(self) -> None:
        """Stop serving: close the port and the batching thread; returns when they are
        (a second call, from any thread, waits for the first and does nothing more)."""
        with self._lock:
            if not self._stopped.is_set():
                self.running.close()
                self._stopped.set()

    def wait(self) -> None:
        """Serve until Ctrl-C (KeyboardInterrupt) or ``stop()`` from another thread."""
        try:
            while not self._stopped.wait(0.5) and self.running.thread.is_alive():
                pass
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()

    def __enter__(self) -> Deployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
