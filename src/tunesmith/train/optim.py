"""The optimizer and the learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from tunesmith.options import OptimOptions

if TYPE_CHECKING:
    from tunesmith.config import SftArgs


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


@dataclass(frozen=True)
class Schedule:
    """How many optimizer steps the run takes."""

    steps_per_epoch: int
    """Optimizer steps in one pass over the data."""
    total_steps: int
    """--max_steps, else the steps of --num_train_epochs."""
    warmup: int
    """Warmup steps."""


def schedule(
    args: SftArgs, optim: OptimOptions, n_batches: int, optimizer: torch.optim.Optimizer
) -> tuple[Schedule, torch.optim.lr_scheduler.LambdaLR]:
    """The step counts of the run and its learning-rate scheduler."""
    steps_per_epoch = max(1, math.ceil(n_batches / args.gradient_accumulation_steps))
    total_steps = (
        args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * steps_per_epoch)
    )
    warmup = optim.warmup_steps or math.ceil(optim.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(optim.scheduler, warmup, total_steps)
    )
    return Schedule(steps_per_epoch, total_steps, warmup), scheduler
