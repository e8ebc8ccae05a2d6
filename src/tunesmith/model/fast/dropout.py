"""LoRA dropout that CUDA graphs and recompute can replay: masks from a counter-based hash.

peft's LoRA dropout (``nn.Dropout``) and tunesmith's shared one (``lora_dropout.py``) draw
each mask from the generator's running state. That breaks two things on the fast path:

- a CUDA graph replays the draw it captured, so a random mask must come from state that the
  graph *reads* (device memory), not state baked into the captured launch;
- with recompute (gradient checkpointing, the graphs' backward), forward and recompute must
  draw the same mask; torch's checkpoint saves and restores the generator's state for that,
  which a graph cannot do (and a saved mask costs a byte an element, 1.7 GB a step on 7B).

Here a mask is a pure function of (a step seed held in a one-element device tensor, a fixed
number per LoRA input -- the salt --, the element's index): element ``i`` is kept when
``fmix32(i * C ^ fmix32(seed ^ salt'))`` (murmur3's finaliser, 32-bit) is at least
``p * 2**32``, and kept elements are scaled by ``1 / (1 - p)``: peft's expectation, inverted
scaling, applied to the LoRA branch's input only. Forward, recompute and backward regenerate
the same mask from the same three numbers; nothing is stored. The seed is redrawn from torch's
generator (``random_`` on the device: no host sync, graph-safe because it runs eagerly before
the graphs read it) at every training forward of the decoder, so each step and micro-batch
gets new masks, seeding with ``--seed`` and exact resume (RNG states) work as before.

As with ``SharedInputDropout``, projections that read the same tensor (q/k/v, gate/up) share
one mask (their group's salt); each projection's own mask is still an independent draw per
element with drop probability ``p``.

On CUDA the masks are applied by one Triton kernel (``_drop_kernel``: ``out = keep * x * s``,
optionally ``+ acc``); elsewhere, and as the CPU tests' reference, by the same integer math in
plain PyTorch (``drop_reference``), bit for bit the same mask.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

M32 = 0xFFFFFFFF
GOLDEN = 0x9E3779B9  # salts spread over the key space
STRIDE = 0x27D4EB2F  # odd: i -> i * STRIDE is a bijection mod 2**32
SEED_ATTR = "_ts_drop_seed"


@dataclass(frozen=True)
class Drop:
    """One dropout mask's parameters (what forward, recompute and backward regenerate it from)."""

    seed: torch.Tensor
    """One-element int64 device tensor: the step's seed (read by the kernel, not the host)."""
    salt: int
    """Which LoRA input (fixed per input for the run)."""
    p: float
    """Drop probability."""

    @property
    def threshold(self) -> int:
        """Hash values below this are dropped: ``round(p * 2**32)``."""
        return round(self.p * 2**32)

    @property
    def scale(self) -> float:
        """Inverted dropout's scale for the kept elements."""
        return 1.0 / (1.0 - self.p)

    @property
    def salt_mix(self) -> int:
        """The salt spread over 31 bits (an int32 kernel argument)."""
        return (self.salt * GOLDEN) & 0x7FFFFFFF


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """murmur3's 32-bit finaliser on int64 tensors holding uint32 values."""
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & M32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & M32
    return h ^ (h >> 16)


def keep_mask(drop: Drop, shape: torch.Size, device: torch.device) -> torch.Tensor:
    """The boolean keep mask of ``drop`` for a contiguous tensor of ``shape`` (reference)."""
    key = _fmix32((drop.seed.to(device).reshape(()) & M32) ^ drop.salt_mix)
    index = torch.arange(shape.numel(), dtype=torch.int64, device=device)
    h = _fmix32(((index * STRIDE) & M32) ^ key)
    return (h >= drop.threshold).view(shape)


def drop_reference(x: torch.Tensor, drop: Drop, acc: torch.Tensor | None = None) -> torch.Tensor:
    """``keep * x * scale (+ acc)`` in plain PyTorch: the CPU path and the tests' reference."""
    keep = keep_mask(drop, x.shape, x.device)
    work = torch.promote_types(x.dtype, torch.float32)  # the kernel's fp32 (fp64 stays fp64)
    y = torch.where(keep, x.to(work) * drop.scale, 0.0)
    if acc is not None:
        y = y + acc.to(work)
    return y.to(x.dtype)


def apply_drop(x: torch.Tensor, drop: Drop) -> torch.Tensor:
    """``x`` with ``drop``'s mask applied (a new tensor, ``x``'s dtype and shape)."""
    if x.is_cuda and _triton() is not None:
        return _launch(x.contiguous(), drop, None)
    return drop_reference(x.contiguous(), drop)


def add_drop_(acc: torch.Tensor, x: torch.Tensor, drop: Drop) -> torch.Tensor:
    """``acc += keep * x * scale`` (the gradient of the dropped-out input), in place."""
    if acc.is_cuda and acc.is_contiguous() and _triton() is not None:
        _launch(x.contiguous(), drop, acc)
        return acc
    return acc.copy_(drop_reference(x.contiguous(), drop, acc))


_KERNEL: list[Any] = []


def _triton() -> Any:
    """The Triton kernel (``dropout_kernel.py``), or None without Triton (then the reference
    runs)."""
    if not _KERNEL:
        try:
            from tunesmith.model.fast.dropout_kernel import drop_kernel
        except ImportError:
            drop_kernel = None
        _KERNEL.append(drop_kernel)
    return _KERNEL[0]


BLOCK = 2048


def _launch(x: torch.Tensor, drop: Drop, acc: torch.Tensor | None) -> torch.Tensor:
    out = acc if acc is not None else torch.empty_like(x)
    n = x.numel()
    grid = ((n + BLOCK - 1) // BLOCK,)
    _triton()[grid](x, out, out, drop.seed, drop.salt_mix, drop.threshold, drop.scale, n,
                    ACC=acc is not None, BLOCK=BLOCK, num_warps=8)  # fmt: skip
    return out


def attach_seed(decoder: nn.Module) -> None:
    """Give ``decoder`` (the module every training forward passes through) the step seed,
    redrawn by a forward pre-hook at each training forward with grad. A non-persistent buffer
    on the module's device: it moves with the model and stays out of checkpoints."""
    if hasattr(decoder, SEED_ATTR):
        return
    first = next(decoder.parameters(), None)
    seed = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64)
    decoder.register_buffer(SEED_ATTR, seed.to(first.device if first is not None else "cpu"),
                            persistent=False)  # fmt: skip
    decoder.register_forward_pre_hook(_new_seed)


def _new_seed(module: nn.Module, _args: Any) -> None:
    if module.training and torch.is_grad_enabled():
        getattr(module, SEED_ATTR).random_(0, 2**31 - 1)


@dataclass
class SeedHome:
    """Where a LoRA layer finds the step seed (the decoder module, held without registering
    it as a submodule) and its salt."""

    module: nn.Module
    """The module holding the seed buffer."""
    salt: int
    """This input's salt; a rank's own range, so processes draw different masks."""

    def drop(self, p: float, device: torch.device) -> Drop:
        """The ``Drop`` of this input for the current step, its seed on ``device`` (moved
        there once if the model was moved without the seed's module)."""
        seed = getattr(self.module, SEED_ATTR)
        if seed.device != device:
            seed = seed.to(device)
            setattr(self.module, SEED_ATTR, seed)  # the buffer itself, for the hook too
        return Drop(seed, self.salt, p)


def rank_salt(index: int) -> int:
    """Salt of LoRA input ``index`` in this process (``RANK`` from the launcher, else 0)."""
    return index + (int(os.environ.get("RANK", "0") or 0) << 20)


def dropout_p(module: nn.Module, name: str) -> float:
    """The LoRA dropout probability of ``module``'s adapter ``name`` now (0 in eval)."""
    from tunesmith.model.lora_dropout import SharedInputDropout

    d = module.lora_dropout[name]  # type: ignore[index]
    if isinstance(d, (nn.Dropout, SharedInputDropout)) and d.training:
        return float(d.p)
    return 0.0


def graph_unsafe_dropout(layer: nn.Module) -> str:
    """'' when every dropout in ``layer`` is the fused LoRA layers' graph-safe one, else
    which one a CUDA graph would replay (or a recompute redraw differently)."""
    lora_drops: set[int] = set()
    for m in layer.modules():
        drops = getattr(m, "lora_dropout", None)
        if not isinstance(drops, nn.ModuleDict):
            continue
        fused = getattr(m, "_tunesmith_fused", False)
        if not fused and any(dropout_p(m, name) > 0 for name in drops):
            return "LoRA dropout outside the fused LoRA layers"
        lora_drops.update(id(d) for d in drops.values())
    for m in layer.modules():
        if id(m) not in lora_drops and isinstance(m, nn.Dropout) and m.training and m.p > 0:
            return "dropout outside the LoRA layers"
    return ""
