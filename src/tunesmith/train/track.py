"""Training metrics: ``logging.jsonl``, trackers (TensorBoard via Accelerate) and PNG plots."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from tunesmith.utils import UserError, logger, write_jsonl

# --report_to names Accelerate understands; each is also the module (and pip package) it needs.
TRACKERS = (
    "tensorboard", "wandb", "mlflow", "swanlab", "comet_ml", "aim", "clearml", "dvclive", "trackio",
)  # fmt: skip


def check_trackers(report_to: list[str]) -> list[str]:
    """The ``--report_to`` trackers to use ("none" dropped), each known and installed.

    Accelerate skips a tracker whose package is missing with only a warning, so a run meant
    for wandb would train for hours and log nowhere; refuse before anything starts instead.
    """
    import importlib.util

    chosen = [r for r in report_to if r != "none"]
    for name in chosen:
        if name == "all":  # Accelerate: every tracker that is installed
            continue
        if name not in TRACKERS:
            raise UserError(
                f"--report_to {name}: unknown tracker; choose from none, all, {', '.join(TRACKERS)}"
            )
        if importlib.util.find_spec(name) is None:
            raise UserError(
                f"--report_to {name}: {name} is not installed; pip install {name} "
                "(or --report_to none)"
            )
    return chosen


def memory_gb() -> float:
    """Peak accelerator memory in GiB on GPU, else the process's resident memory."""
    import torch

    if torch.cuda.is_available():
        from tunesmith.model.fast.graphs import SLACK

        # CUDA graphs' replays allocate nothing: their pool's scratch is counted on top.
        return (torch.cuda.max_memory_allocated() + SLACK[0]) / 2**30
    try:
        with open(f"/proc/{os.getpid()}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


class JsonlLog:
    """Append one JSON object per logging step; flushed at once so a crash keeps the history."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (kept open for the run)

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` as one line."""
        self.file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.file.flush()

    def close(self) -> None:
        """Close the file."""
        self.file.close()


def truncate_log(path: Path, step: int) -> None:
    """Drop records after ``step`` (a resumed run rewrites them), keeping the file's history."""
    if not path.is_file():
        return
    write_jsonl(path, [r for r in read_log(path) if r.get("step", 0) <= step])


def read_log(path: Path) -> list[dict[str, Any]]:
    """The records of a ``logging.jsonl``."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_curves(log_path: Path, out_dir: Path) -> list[Path]:
    """PNG plots of every logged curve (train loss, learning rate, eval loss, …)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_log(log_path)
    keys = [("loss", "train loss"), ("eval_loss", "eval loss"), ("lr", "learning rate")]
    keys += [("grad_norm", "gradient norm"), ("token_acc", "train token accuracy")]
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for key, title in keys:
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        if not points:
            continue
        fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, marker="o" if len(xs) < 40 else None, markersize=3, linewidth=1.5)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        if key == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
        fig.tight_layout()
        path = out_dir / f"{key}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    if written:
        logger.info(f"plots: {out_dir}")
    return written


def evaluate(loss_module: Any, loader: Any, accelerator: Any) -> dict[str, float]:
    """Token-weighted loss and next-token accuracy over the validation set, all processes."""
    import torch

    loss_module.eval()
    total = torch.zeros(3, device=accelerator.device)
    for batch in loader:
        with torch.no_grad():
            loss_sum, n, correct = loss_module(**batch)
        total += torch.stack([loss_sum.float(), n.float(), correct.float()])
    total = accelerator.reduce(total, reduction="sum")
    loss_module.train()
    n = max(float(total[1]), 1.0)
    return {
        "eval_loss": round(float(total[0]) / n, 6),
        "eval_token_acc": round(float(total[2]) / n, 4),
    }


def packing_report(samples: list, packs: list, batch_size: int, max_length: int) -> str:
    """How full the packed sequences are, and the padding packing saves at this batch size."""

    def padding(rows: list[int]) -> int:
        pad = 0
        for i in range(0, len(rows), batch_size):
            chunk = rows[i : i + batch_size]
            pad += max(chunk) * len(chunk) - sum(chunk)
        return pad

    plain = [len(s.input_ids) for s in samples]
    packed = [sum(len(s.input_ids) for s in p) for p in packs]
    fill = sum(packed) / (len(packs) * max_length)
    return (
        f"packed {len(samples)} samples into {len(packs)} sequences ({fill:.0%} of "
        f"--max_length {max_length} used); padding at batch size {batch_size}: "
        f"{padding(plain)} tokens unpacked, {padding(packed)} packed"
    )


def log_record(
    window: dict[str, float],
    step: int,
    steps_per_epoch: int,
    total_steps: int,
    t0: float,
    lr: float,
    grad_norm: float | None,
    every: int,
    first_step: int = 0,
) -> dict[str, Any]:
    """One ``logging.jsonl`` line from the counters accumulated since the last one."""
    now = time.perf_counter()
    span = max(now - window["t"], 1e-9)
    n = every if step % every == 0 else step % every
    elapsed = now - t0
    return {
        "step": step,
        "epoch": round(step / steps_per_epoch, 4),
        "loss": round(window["loss"] / n, 6),
        "token_acc": round(window["correct"] / max(1, window["trained"]), 4),
        "lr": lr,
        "grad_norm": None if grad_norm is None else round(grad_norm, 6),
        "tokens_per_s": round(window["tokens"] / span, 1),
        "trained_tokens_per_s": round(window["trained"] / span, 1),
        "memory_gb": round(memory_gb(), 3),
        "elapsed_s": round(elapsed, 2),
        "remaining_s": round(elapsed / max(1, step - first_step) * (total_steps - step), 2),
    }


class BestTracker:
    """Follows the validation metric: the best step, its checkpoint, and early stopping."""

    def __init__(self, metric: str, patience: int | None) -> None:
        self.key = f"eval_{metric}"
        self.higher_is_better = metric == "token_acc"
        self.patience = patience
        self.best: float | None = None
        self.best_step: int | None = None
        self.checkpoint: Path | None = None
        self.bad_evals = 0

    def update(self, record: dict[str, Any], step: int) -> bool:
        """Take one evaluation; True when it is the best so far."""
        value = record[self.key]
        better = self.best is None or (
            value > self.best if self.higher_is_better else value < self.best
        )
        if better:
            self.best, self.best_step, self.bad_evals = value, step, 0
        else:
            self.bad_evals += 1
        return better

    @property
    def should_stop(self) -> bool:
        """True after ``patience`` evaluations in a row without improvement."""
        return bool(self.patience) and self.bad_evals >= self.patience  # type: ignore[operator]

    def state(self) -> dict[str, Any]:
        """What trainer_state.json records about the best model."""
        return {
            "best_metric": self.best,
            "best_step": self.best_step,
            "best_model_checkpoint": str(self.checkpoint) if self.checkpoint else None,
        }
