"""Sibling LoRA projections of one input as one autograd function (QKV; gate/up).

q_proj, k_proj and v_proj read the same normed hidden state, as gate_proj and up_proj do.
Run one by one (``lora_fused.py``) each is its own autograd node: it saves its own reference
to the input, launches its own rank-r GEMMs and, in backward, its own Python call. Here one
``torch.autograd.Function`` serves the group:

    xa = x @ [s1 A1; s2 A2; ...].T          one skinny GEMM for the whole group
    y_i = x @ W_i.T (+ b_i) + xa_i @ B_i.T  the frozen base GEMM, the adapter added in place

and backward forms ``dx`` in one accumulating chain (``dy_i @ W_i`` summed by addmm, then
``[dy_i B_i] @ [s_i A_i]`` as one GEMM), all the A gradients as one GEMM (K = tokens) and
each B gradient from the saved ``xa``. The frozen weights stay where they are (no
concatenated copy of the base: that would cost its memory again).

The model code still calls each projection on its own (``self.k_proj(hidden_states)``), so
the group runs when its first member is called and hands the other outputs to the members
called next with the *same* input tensor; any other call (another input, adapters switched
off) goes through the member's own fused or peft forward. With LoRA dropout the group draws
one mask for its input (``dropout.py``, the first member's salt: as ``SharedInputDropout``
does), so ``drop(x) @ A_cat.T`` stays one GEMM; the mask is regenerated in backward.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tunesmith.model.fast import lora_fused
from tunesmith.model.fast.dropout import Drop, add_drop_, apply_drop, dropout_p
from tunesmith.model.fast.lora_fused import _dense, _fused_forward, compute_copy

# Sibling projections that read one input, by attribute name (Qwen2, Llama, Mistral, ...).
GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class LoraGroupFunction(torch.autograd.Function):
    """``y_i = x @ W_i.T + b_i + s_i (x @ A_i.T) @ B_i.T`` for a group sharing ``x``.

    ``frozen`` is a tuple of (weight, bias) per member, ``scalings`` their LoRA scalings;
    ``adapters`` are A_1, B_1, A_2, B_2, ... (the trained parameters, any dtype).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        frozen: tuple[tuple[torch.Tensor, torch.Tensor | None], ...],
        scalings: tuple[float, ...],
        drop: Drop | None,
        *adapters: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        """The members' outputs, each (..., out_i) in ``x``'s dtype."""
        dtype = x.dtype
        x2 = x.reshape(-1, x.shape[-1])
        a_list = [compute_copy(a, dtype, s) for a, s in zip(adapters[::2], scalings, strict=True)]
        b_list = [compute_copy(b, dtype) for b in adapters[1::2]]
        a_cat = _cat_cached(a_list)
        xd = x2 if drop is None else apply_drop(x2, drop)
        xa = xd @ a_cat.t()  # (n, sum of ranks): each block already scaled by its s_i
        del xd
        ranks = [a.shape[0] for a in a_list]
        outs = []
        for (weight, bias), xa_i, b in zip(frozen, xa.split(ranks, 1), b_list, strict=True):
            w = _dense(weight, dtype)
            y = torch.addmm(bias.to(dtype), x2, w.t()) if bias is not None else x2 @ w.t()
            y.addmm_(xa_i, b.t())
            outs.append(y.view(*x.shape[:-1], y.shape[-1]))
        ctx.save_for_backward(x, xa, a_cat, *b_list)
        ctx.weights = [w for w, _ in frozen]  # by reference: see LoraLinearFunction
        ctx.scalings = scalings
        ctx.drop = drop
        ctx.ranks = ranks
        ctx.dtypes = [p.dtype for p in adapters]
        ctx.set_materialize_grads(False)  # an output nobody used has no gradient to add
        return tuple(outs)

    @staticmethod
    def backward(ctx: Any, *dys: torch.Tensor | None) -> tuple[Any, ...]:  # type: ignore[override]
        """Gradients for x and every A_i, B_i."""
        x, xa, a_cat, *b_list = ctx.saved_tensors
        dtype = x.dtype
        x2 = x.reshape(-1, x.shape[-1])
        n = x2.shape[0]
        need_x = ctx.needs_input_grad[0]
        dx = None
        dybs, dbs = [], []
        for dy, weight, b, xa_i in zip(dys, ctx.weights, b_list, xa.split(ctx.ranks, 1),
                                       strict=True):  # fmt: skip
            if dy is None:
                dybs.append(x2.new_zeros(n, b.shape[1]))
                dbs.append(None)
                continue
            dy2 = dy.reshape(-1, dy.shape[-1]).to(dtype)
            if need_x:
                w = _dense(weight, dtype)
                dx = dy2 @ w if dx is None else dx.addmm_(dy2, w)
            dybs.append(dy2 @ b)
            dbs.append(dy2.t() @ xa_i)  # xa_i carries s_i already
        dyb = torch.cat(dybs, 1) if len(dybs) > 1 else dybs[0]  # (n, sum of ranks)
        drop = ctx.drop
        if need_x:
            if drop is None:
                dx = dyb @ a_cat if dx is None else dx.addmm_(dyb, a_cat)
            elif dx is None:
                dx = apply_drop(dyb @ a_cat, drop)
            else:  # the adapters' share passes back through the group's mask
                add_drop_(dx, dyb @ a_cat, drop)
            dx = dx.view(x.shape)
        xd = x2 if drop is None else apply_drop(x2, drop)
        da_cat = dyb.t() @ xd  # (sum of ranks, in), unscaled
        del xd
        grads: list[torch.Tensor | None] = []
        for i, (da, db) in enumerate(zip(da_cat.split(ctx.ranks, 0), dbs, strict=True)):
            out = torch.empty(da.shape, dtype=ctx.dtypes[2 * i], device=da.device)
            grads.append(torch.mul(da, ctx.scalings[i], out=out))
            grads.append(None if db is None else db.to(ctx.dtypes[2 * i + 1]))
        return (dx, None, None, None, *grads)


def _cat_cached(parts: list[torch.Tensor]) -> torch.Tensor:
    """``torch.cat(parts)``, cached on the first part until any part changes (the parts are
    ``compute_copy`` results: new tensors after each optimizer step; or, in fp32, the
    parameters themselves: keyed by the optimizer-step count too, since fused optimizers
    leave version counters alone)."""
    if not lora_fused.CACHE_COPIES:
        return torch.cat(parts)
    key = [(id(t), t.data_ptr(), t._version, lora_fused._STEPS[0]) for t in parts]
    cached = getattr(parts[0], "_tunesmith_cat", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    t = torch.cat(parts)
    parts[0]._tunesmith_cat = (key, t)  # type: ignore[attr-defined]
    return t


@dataclass
class LoraGroup:
    """Sibling LoRA layers computed together, and the outputs waiting for their callers."""

    members: list[nn.Module]
    """The peft LoRA layers of the group, in the model's call order."""
    x: torch.Tensor | None = None
    """The input the waiting outputs were computed from."""
    waiting: dict[int, torch.Tensor] = field(default_factory=dict)
    """Member index -> its output, computed with another member's call."""

    def adapter(self) -> str | None:
        """The one active adapter when every member can be grouped now, else None (also when
        the members' dropout probabilities differ)."""
        first = self.members[0]
        active = first.active_adapters
        if len(active) != 1:
            return None
        name = active[0]
        for m in self.members:
            if m.disable_adapters or m.merged or m.active_adapters != active:
                return None
            if name not in m.lora_A:
                return None
            if dropout_p(m, name) != dropout_p(first, name):
                return None
        return name

    def run(self, x: torch.Tensor, name: str) -> list[torch.Tensor]:
        """Every member's output for ``x``."""
        frozen = tuple((m.base_layer.weight, m.base_layer.bias) for m in self.members)
        scalings = tuple(float(m.scaling[name]) for m in self.members)
        adapters = []
        for m in self.members:
            adapters += [m.lora_A[name].weight, m.lora_B[name].weight]
        first = self.members[0]
        p = dropout_p(first, name)
        drop = first._ts_seed.drop(p, x.device) if p > 0 else None
        return list(LoraGroupFunction.apply(x, frozen, scalings, drop, *adapters))


def _grouped_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    group: LoraGroup = self._tunesmith_group
    index: int = self._tunesmith_index
    if group.x is x and index in group.waiting:
        out = group.waiting.pop(index)
        if not group.waiting:
            group.x = None
        return out
    name = None if args or kwargs else group.adapter()
    if name is None:
        return _fused_forward(self, x, *args, **kwargs)
    outs = group.run(x, name)
    group.x = x
    group.waiting = {i: y for i, y in enumerate(outs) if i != index}
    return outs[index]


def group_lora_layers(model: nn.Module) -> int:
    """Group the fused sibling projections of every block (``GROUPS``); returns how many
    groups were formed. Call after ``patch_lora_layers``."""
    groups = 0
    for parent in model.modules():
        for names in GROUPS:
            members = [getattr(parent, n, None) for n in names]
            if not all(getattr(m, "_tunesmith_fused", False) for m in members):
                continue
            group = LoraGroup(members=members)  # type: ignore[arg-type]
            for index, m in enumerate(members):
                m._tunesmith_group = group  # type: ignore[union-attr]
                m._tunesmith_index = index  # type: ignore[union-attr]
                m.forward = types.MethodType(_grouped_forward, m)  # type: ignore[union-attr]
            groups += 1
    return groups
