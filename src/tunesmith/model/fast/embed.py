"""A frozen input embedding kept in host memory (``--fast embed``).

A LoRA/QLoRA run never trains the input embedding, and an untied one is read only at the
rows of the batch's token ids: on Qwen2.5-7B it is 152,064 x 3,584 bf16 = 1.02 GiB of GPU
memory for a 14 MiB gather a step (2,048 tokens). Here the weight moves to pinned host
memory; each forward gathers the batch's rows on the CPU into a pinned buffer and copies them
to the GPU without blocking. The output is the same tensor the GPU gather would give (a copy
of the same rows). A tied embedding (it is the LM head too) or a trained one stays on the GPU.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn


def offload_embedding(model: nn.Module, pin: bool = True) -> str:
    """Move a frozen, untied input embedding of a model already on the GPU to host memory;
    returns what was done ('' when it does not apply). Call after the model is placed."""
    from tunesmith.model.lora import hf_model

    lm = hf_model(model)
    emb = lm.get_input_embeddings()
    head = lm.get_output_embeddings()
    if type(emb) is not nn.Embedding or emb.weight.requires_grad or emb.weight.device.type == "cpu":
        return ""
    if head is not None and getattr(head, "weight", None) is emb.weight:
        return ""
    if emb.max_norm is not None:  # (padding_idx only shapes the gradient: frozen here)
        return ""  # only the plain gather is served
    size = emb.weight.numel() * emb.weight.element_size()
    host_embedding(emb, emb.weight.device, pin)
    return f"input embedding in host memory ({size / 2**30:.2f} GiB off the GPU)"


def host_embedding(emb: nn.Embedding, device: torch.device, pin: bool = True) -> None:
    """Keep ``emb``'s weight in (pinned) host memory and gather there; its outputs go to the
    ids' device, or ``device`` for ids on the CPU."""
    host = emb.weight.detach().to("cpu")
    emb.weight.data = host.pin_memory() if pin else host
    emb._ts_device = device  # type: ignore[assignment]
    emb._ts_buffer = None  # type: ignore[assignment]
    emb.forward = types.MethodType(_host_forward, emb)  # type: ignore[method-assign]


def _host_forward(self: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
    """``weight[ids]`` gathered on the CPU, sent to the ids' device (the model's)."""
    weight = self.weight
    target = ids.device if ids.device.type != "cpu" else self._ts_device  # type: ignore[attr-defined]
    flat = ids.reshape(-1).to("cpu")  # a small copy: the ids are ready at the step's start
    rows = _buffer(self, flat.numel(), weight)
    torch.index_select(weight, 0, flat, out=rows)
    out = rows.to(target, non_blocking=weight.is_pinned())
    if weight.is_pinned() and target.type == "cuda":
        # The next gather must not overwrite the pinned rows before this copy has read them.
        event: Any = torch.cuda.Event()
        event.record()
        self._ts_event = event  # type: ignore[assignment]
    return out.view(*ids.shape, weight.shape[1])


def _buffer(self: nn.Embedding, n: int, weight: torch.Tensor) -> torch.Tensor:
    """A (n, dim) host buffer, pinned like the weight, reused across steps."""
    event = getattr(self, "_ts_event", None)
    if event is not None:
        event.synchronize()
        self._ts_event = None  # type: ignore[assignment]
    buf = self._ts_buffer  # type: ignore[attr-defined]
    if buf is None or buf.shape[0] < n:
        buf = torch.empty((n, weight.shape[1]), dtype=weight.dtype, pin_memory=weight.is_pinned())
        self._ts_buffer = buf  # type: ignore[assignment]
    return buf[:n]
