"""Fresh autograd leaves for a layer's trained parameters while a CUDA graph is captured.

A parameter's gradient accumulator (autograd's AccumulateGrad node) is made once, kept while
any autograd graph refers to it, and remembers the CUDA stream it was made on. A training loop
that keeps last step's loss alive while the next forward runs (most do: ``loss = ...`` is
reassigned only after the forward) keeps those accumulators, made on the default stream; an
``autograd.grad`` captured on the graphs' side stream then makes the legacy default stream
wait on the capturing stream, which CUDA refuses: "operation would make the legacy stream
depend on a capturing blocking stream" (bench/RESULTS.md, issue 17, sessions 5 and 6). With
aliases (same storage, new leaves) the captured work makes its own accumulators on the
capturing stream, and replays still read the optimizer's in-place updates.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def aliased(layer: nn.Module, aliases: dict[int, torch.Tensor]) -> Iterator[None]:
    """The layer's trained parameters replaced by ``aliases`` (by id) while a captured function
    runs, so its gradient accumulators are made on the capturing stream. A parameter's own one
    remembers the stream it was made on: one made on the default stream and still alive (a loop
    holding last step's loss) would make the legacy stream wait on the capture, which CUDA
    refuses ("operation would make the legacy stream depend on a capturing blocking stream")."""
    swapped = []
    for m in layer.modules():
        for name, p in m._parameters.items():
            if p is not None and id(p) in aliases:
                swapped.append((m, name, p))
                m._parameters[name] = aliases[id(p)]  # type: ignore[assignment]
    try:
        yield
    finally:
        for m, name, p in swapped:
            m._parameters[name] = p
