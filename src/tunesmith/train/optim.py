"""The optimizer and the learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from tunesmith.options import OptimOptions


def adamw(params: list[torch.nn.Parameter], opts: OptimOptions, fused: bool) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on biases and norms)."""
    return torch.optim.AdamW(
        [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": opts.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=opts.learning_rate,
        betas=opts.betas,
        fused=fused,
    )


def lr_lambda(kind: str, warmup: int, total: int) -> Callable[[int], float]:
    """Multiplier of the peak learning rate at each step: linear warmup, then the schedule."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f
