"""Training metrics: ``logging.jsonl``, trackers (TensorBoard via Accelerate) and PNG plots."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tunesmith.utils import logger


def memory_gb() -> float:
    """Peak accelerator memory in GiB on GPU, else the process's resident memory."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
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
