"""Frozen base weights prepacked once for oneDNN, for LoRA training on the CPU.

LoRA never changes the base weights, so the GEMM library's own weight layout can be made once
instead of at every call: ``torch.ops.mkldnn._reorder_linear_weight`` (the op inductor's CPU
path uses) packs a weight, ``torch.ops.mkldnn._linear_pointwise`` multiplies with it. A
training step needs ``x @ W.T`` (forward) and ``dy @ W`` (the input gradient): the second is a
linear with ``W.T`` as its weight, so each layer keeps two packed copies (memory: two more
copies of the decoder's linear weights, in the compute dtype).

Why it pays (``bench/cpu_packed_matmul.py``, ``bench/RESULTS.md`` "CPU, session 5"): torch's
plain fp32 matmul is MKL's sgemm, which on AMD CPUs runs far below the cores' AVX-512 rate;
oneDNN's kernels do not have that problem, and packing saves the per-call reorder.
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class PackedWeight:
    """One frozen weight ``W`` (out, in) packed for oneDNN in one dtype, both ways round."""

    fwd: torch.Tensor
    """``W`` packed: ``linear(x, fwd)`` is ``x @ W.T``."""
    bwd: torch.Tensor
    """``W.T`` packed: ``linear(dy, bwd)`` is ``dy @ W``."""
    key: tuple[int, int, torch.dtype]
    """The weight's storage address, version and the dtype packed for (stale when changed)."""


def available(dtype: torch.dtype) -> bool:
    """Whether this torch build can pack and multiply in ``dtype`` on this CPU."""
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return dtype == torch.float32


def packed(layer: nn.Linear, dtype: torch.dtype) -> PackedWeight:
    """``layer.weight`` packed for ``dtype``, made on first use and kept on the layer.

    Re-packed when the weight's storage or version changes (a weight loaded or edited in
    place), so a stale copy is never used; the weight must not require grad.
    """
    w = layer.weight
    key = (w.data_ptr(), w._version, dtype)
    cached: PackedWeight | None = getattr(layer, "_tunesmith_packed", None)
    if cached is not None and cached.key == key:
        return cached
    with torch.no_grad():
        wd = w.detach().to(dtype)
        fwd = torch.ops.mkldnn._reorder_linear_weight(wd, None)
        bwd = torch.ops.mkldnn._reorder_linear_weight(wd.t().contiguous(), None)
    cached = PackedWeight(fwd, bwd, key)
    layer._tunesmith_packed = cached
    return cached


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ W.T + bias`` with a packed weight (``PackedWeight.fwd`` or ``.bwd``)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class FrozenLinear(torch.autograd.Function):
    """``x @ W.T`` for a frozen ``W`` prepacked both ways; only ``x`` gets a gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, pack: PackedWeight) -> torch.Tensor:  # type: ignore[override]
        """The product in ``x``'s dtype."""
        ctx.pack = pack
        return linear(x, pack.fwd, None)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        """``dy @ W``."""
        return linear(dy.contiguous(), ctx.pack.bwd, None), None


@dataclass
class PackedHead:
    """The switch of a prepacked LM head (``enabled``: False goes through ``nn.Linear``)."""

    enabled: bool = True
    """Multiply with the packed weight."""


def _head_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    dtype = x.dtype
    if (
        not self._tunesmith_head.enabled
        or self.weight.requires_grad
        or x.device.type != "cpu"
        or dtype != self.weight.dtype  # what autocast would do is F.linear's business
        or not available(dtype)
    ):
        return nn.Linear.forward(self, x)
    return FrozenLinear.apply(x, packed(self, dtype))


def pack_head(head: nn.Module) -> PackedHead | None:
    """Route a frozen, bias-free ``nn.Linear`` LM head through ``FrozenLinear`` (packed on its
    first call, in the activations' dtype); its switch, or None when the head is not one.

    On the 0.5B demo model the head (151,936 x 896) is ~12 % of a step's matmul FLOPs on the
    trained positions, and plain fp32 ``F.linear`` is MKL's slow path on AMD (module doc)."""
    if type(head) is not nn.Linear or head.bias is not None or head.weight.requires_grad:
        return None
    switch = PackedHead()
    head._tunesmith_head = switch
    head.forward = types.MethodType(_head_forward, head)
    return switch
