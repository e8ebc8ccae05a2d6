"""LoRA on the CPU: the layers that read one input as one autograd function.

A LoRA step of a small model on a CPU is bound by the base matmuls *and* by PyTorch's
per-operator cost: peft runs every LoRA layer as ~10 autograd nodes (dropout, two casts of
the fp32 adapter weights, two skinny matmuls, a scale, an add), 168 layers a step on the
0.5B demo model, twice (forward and backward). q/k/v read the same attention input and
gate/up the same MLP input, so here each such group is one ``torch.autograd.Function``:

    xd = drop(x)                      one shared mask (as ``lora_dropout.SharedInputDropout``)
    xa = xd @ cat(A_q, A_k, A_v).T    ONE skinny matmul for the group's A projections
    y_i = x @ W_i.T + b_i + s * xa_i @ B_i.T      (addmm; the adapter accumulates into y_i)

and its backward, by hand:

    dyb = cat(dy_i @ B_i)             (n, 3r)
    dx  = sum_i dy_i @ W_i + s * drop(dyb @ cat(A))
    dA  = s * dyb.T @ xd  (split by member)       dB_i = s * dy_i.T @ xa_i

The math is peft's (``base(x) + B(A(drop(x))) * s``) with the shared-input dropout that
tunesmith already uses on the CPU; the adapter weights stay fp32 (the optimizer's master
copy) and are cast to the compute dtype once per group call, their gradients cast back.

The first member called computes the whole group and keeps the other members' outputs for
their own call with the *same* input tensor (identity and version checked, as the shared
dropout does); the cache is dropped when the parent module's forward returns. A member
called with another input computes alone, so the grouping by name only decides speed,
never the result. Anything peft's forward does that this does not model (several or
merged adapters, DoRA, adapters switched off) goes through peft's forward.
"""

from __future__ import annotations

import types
import weakref
from typing import Any

import torch
from torch import nn

from tunesmith.model import packed_linear
from tunesmith.model.lora_dropout import SharedInputDropout, keep_mask, quantized_p
from tunesmith.model.packed_linear import PackedWeight

# Projections that read the same tensor in Qwen2/Llama-family blocks (speed only: see above).
GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
# GroupedLoraFunction's arguments before the members' tensors: x, keep, keep_scale, scaling, packs.
_LEAD = 5


class GroupedLoraFunction(torch.autograd.Function):
    """Outputs of the LoRA linear layers ``members`` that all read ``x``.

    ``tensors`` holds (W, b or None, A, B) per member; ``keep`` is the dropout's boolean mask
    (None: no dropout) and ``keep_scale`` its 1 / (1 - p); ``packs``, when given, the members'
    base weights prepacked for oneDNN in ``x``'s dtype (``packed_linear``), used instead of W.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        keep: torch.Tensor | None,
        keep_scale: float,
        scaling: float,
        packs: tuple[PackedWeight, ...] | None,
        *tensors: torch.Tensor | None,
    ) -> tuple[torch.Tensor, ...]:
        """One output per member, each (..., out_i) in ``x``'s dtype."""
        dtype = x.dtype
        x2 = x.reshape(-1, x.shape[-1])
        weights, biases = tensors[0::4], tensors[1::4]
        # The adapters in the compute dtype, cast once here and kept for backward.
        a_cat = torch.cat([a.to(dtype) for a in tensors[2::4]])  # type: ignore[union-attr]
        b_list = [b.to(dtype) for b in tensors[3::4]]  # type: ignore[union-attr]
        # The mask as 0/1 in the compute dtype (no bool promotion at every use); the scale
        # 1/(1-p) stays a float multiplier, not rounded to bf16, so the expectation is kept.
        mask = None if keep is None else keep.view(x2.shape).to(dtype)
        xd = x2 if mask is None else (x2 * mask).mul_(keep_scale)
        xa = xd @ a_cat.t()  # (n, members x r)
        rank = a_cat.shape[0] // len(b_list)
        outs = []
        for i, (w, bias, b) in enumerate(zip(weights, biases, b_list, strict=True)):
            bias = None if bias is None else bias.to(dtype)
            if packs is not None:
                y = packed_linear.linear(x2, packs[i].fwd, bias)
            else:
                w = w if w.dtype == dtype else w.to(dtype)  # type: ignore[union-attr]
                y = torch.addmm(bias, x2, w.t()) if bias is not None else x2 @ w.t()
            y.addmm_(xa[:, i * rank : (i + 1) * rank], b.t(), alpha=scaling)
            outs.append(y.view(*x.shape[:-1], y.shape[-1]))
        ctx.save_for_backward(x, mask, xa, a_cat, *b_list)
        # Frozen base weights are held by reference: they need no saving (and a checkpointing
        # hook would hand back detached copies).
        ctx.weights, ctx.packs = weights, packs
        ctx.grad_dtypes = [t.dtype for t in tensors[2::4]], [t.dtype for t in tensors[3::4]]  # type: ignore[union-attr]
        ctx.scaling, ctx.rank, ctx.keep_scale = scaling, rank, keep_scale
        return tuple(outs)

    @staticmethod
    def backward(ctx: Any, *dys: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        """Gradients for x and every member's A and B (base weights and biases are frozen)."""
        x, mask, xa, a_cat, *b_list = ctx.saved_tensors
        m = len(dys)
        a_dtypes, b_dtypes = ctx.grad_dtypes
        s, dtype, rank = ctx.scaling, x.dtype, ctx.rank
        x2 = x.reshape(-1, x.shape[-1])
        dy2 = [dy.reshape(-1, dy.shape[-1]).to(dtype) for dy in dys]
        dyb = torch.cat([dy @ b for dy, b in zip(dy2, b_list, strict=True)], dim=1)
        dx = None
        if ctx.needs_input_grad[0]:
            dx = dyb @ a_cat  # the adapters' share first, back through the dropout mask
            if mask is not None:
                dx.mul_(mask)
            dx.mul_(s * ctx.keep_scale)
            for i, (dy, w) in enumerate(zip(dy2, ctx.weights, strict=True)):
                if ctx.packs is not None:
                    dx.add_(packed_linear.linear(dy, ctx.packs[i].bwd, None))
                else:
                    dx.addmm_(dy, w if w.dtype == dtype else w.to(dtype))
            dx = dx.view(x.shape)
        grads: list[torch.Tensor | None] = [None] * (4 * m)
        xd = x2 if mask is None else (x2 * mask).mul_(ctx.keep_scale)
        da_cat = (dyb.t() @ xd).mul_(s)
        for i in range(m):
            if ctx.needs_input_grad[_LEAD + 4 * i + 2]:
                grads[4 * i + 2] = da_cat[i * rank : (i + 1) * rank].to(a_dtypes[i])
            if ctx.needs_input_grad[_LEAD + 4 * i + 3]:
                db = (dy2[i].t() @ xa[:, i * rank : (i + 1) * rank]).mul_(s)
                grads[4 * i + 3] = db.to(b_dtypes[i])
        return (dx, *[None] * (_LEAD - 1), *grads)


class LoraGroup:
    """The LoRA layers of one parent module that read one input, and their cached outputs."""

    def __init__(self, members: list[nn.Module], pack: bool = False) -> None:
        self.members = members
        self.pack = pack  # base weights prepacked for oneDNN where it can (packed_linear)
        self._src: Any = None  # weakref to the input the cached outputs were computed from
        self._version = -1
        self._outs: dict[int, torch.Tensor] = {}

    def output(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``layer``'s output for ``x``: from the cache, else computing the whole group."""
        out = self._outs.pop(id(layer), None)
        if out is not None and self._src() is x and self._version == x._version:
            return out
        members = self.members if any(layer is m for m in self.members) else [layer]
        if any(not _servable(m) for m in members):
            members = [layer]
        outs = _group_forward(members, x, self.pack)
        self._src, self._version = weakref.ref(x), x._version
        self._outs = {id(m): o for m, o in zip(members, outs, strict=True) if m is not layer}
        return outs[members.index(layer)]

    def clear(self) -> None:
        """Forget the cached outputs (the parent module's forward has returned)."""
        self._src, self._version, self._outs = None, -1, {}


def _adapter(layer: Any) -> str:
    return layer.active_adapters[0]


def _servable(layer: Any) -> bool:
    """Whether this call of ``layer`` is plain LoRA (one active adapter, not merged, the base
    weight frozen: the function returns no gradient for it)."""
    active = layer.active_adapters
    return (
        not layer.disable_adapters
        and not layer.merged
        and len(active) == 1
        and active[0] in layer.lora_A
        and not layer.base_layer.weight.requires_grad
    )


def _group_forward(members: list[Any], x: torch.Tensor, pack: bool) -> tuple[torch.Tensor, ...]:
    """Run ``GroupedLoraFunction`` for ``members`` on ``x`` (one dropout mask for the group);
    with ``pack``, on base weights prepacked in ``x``'s dtype where oneDNN can and the weights
    are frozen."""
    first = members[0]
    name = _adapter(first)
    drop = first.lora_dropout[name]
    p = drop.p if isinstance(drop, nn.Dropout | SharedInputDropout) and drop.training else 0.0
    p = quantized_p(p)  # the mask's own rounding of p (SharedInputDropout's p already is)
    keep = keep_mask(x.shape, p, x.device) if p > 0 else None
    tensors: list[torch.Tensor | None] = []
    for m in members:
        n = _adapter(m)
        tensors += [m.base_layer.weight, m.base_layer.bias, m.lora_A[n].weight, m.lora_B[n].weight]
    keep_scale = 1.0 / (1.0 - p) if p > 0 else 1.0
    packs = None
    if pack and x.device.type == "cpu" and packed_linear.available(x.dtype):
        bases = [m.base_layer for m in members]
        if not any(b.weight.requires_grad for b in bases):
            packs = tuple(packed_linear.packed(b, x.dtype) for b in bases)
    scaling = float(first.scaling[name])
    return GroupedLoraFunction.apply(x, keep, keep_scale, scaling, packs, *tensors)


def _forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    if args or kwargs or not _servable(self):
        return type(self).forward(self, x, *args, **kwargs)
    return self._tunesmith_group.output(self, x)


def fusable(module: nn.Module) -> bool:
    """A plain peft LoRA linear layer (one adapter, no DoRA, a dense nn.Linear base) whose
    dropout is peft's ``nn.Dropout``, tunesmith's shared one, or none."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    if type(module) is not LoraLinear or len(module.lora_A) != 1 or module.lora_variant:
        return False
    drop = next(iter(module.lora_dropout.values()))
    if type(drop) not in (nn.Identity, nn.Dropout, SharedInputDropout):
        return False
    base = module.base_layer
    return type(base) is nn.Linear and not getattr(base, "fan_in_fan_out", False)


def group_lora_layers(model: nn.Module, pack: bool = False) -> tuple[int, int]:
    """Route every fusable LoRA layer through ``GroupedLoraFunction``, grouping the ones named
    in ``GROUPS`` under one parent. Returns (layers routed, groups of more than one layer).
    ``pack``: multiply with base weights prepacked for oneDNN (``packed_linear``).

    Dropout masks: one per group call, drawn like ``SharedInputDropout``'s (same generator,
    same 16-bit lanes), so a run draws the same masks as with the shared dropout alone.
    """
    from peft.tuners.lora import LoraLayer

    children: dict[int, tuple[nn.Module, dict[str, nn.Module]]] = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and fusable(module):
            parent_name, _, leaf = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            children.setdefault(id(parent), (parent, {}))[1][leaf] = module
    routed = grouped = 0
    for parent, layers in children.values():
        groups = [[layers[n] for n in g if n in layers] for g in GROUPS]
        groups = [g for g in groups if len(g) > 1]
        taken = {id(m) for g in groups for m in g}
        groups += [[m] for m in layers.values() if id(m) not in taken]
        for members in groups:
            group = LoraGroup(members, pack)
            parent.register_forward_hook(_clear_hook(group))
            for m in members:
                m._tunesmith_group = group
                m.forward = types.MethodType(_forward, m)
                routed += 1
            grouped += len(members) > 1
    return routed, grouped


def _clear_hook(group: LoraGroup) -> Any:
    def hook(_module: nn.Module, _args: Any, _output: Any) -> None:
        group.clear()

    return hook
