"""LoRA linear layers as one autograd function: base matmul + adapter in the compute dtype.

peft's ``lora.Linear`` runs ``base(x) + lora_B(lora_A(dropout(x))) * scaling`` as separate
modules: each is its own autograd node that saves its own input, casts the fp32 adapter
weights on every call and launches a scale and an add of its own; under gradient
checkpointing that happens twice per step. Here one ``torch.autograd.Function`` does

    y = x @ W.T (+ bias)          one GEMM (for a 4-bit base: W dequantized just for it)
    y += s * (x @ A.T) @ B.T      two skinny GEMMs, the second accumulating into y (addmm)

in the activations' dtype (bf16 on tensor cores), and saves only ``x`` (already kept alive by
the caller), the rank-r product ``x @ A.T`` and the compute-dtype copies of A and B. Backward:

    dB = s * dy.T @ (x A.T)       dA = s * (dy B).T @ x       dx = dy @ W + s * (dy B) @ A

The frozen base weight is never copied; a 4-bit base is dequantized again in backward rather
than kept (what bitsandbytes' own ``MatMul4Bit`` does too). The adapter weights keep their
dtype (fp32 master weights by default); their compute-dtype copies (A with the scaling folded
in) are made once per optimizer step and cached (``compute_copy``), not on every call: the
previous version cast them in forward, recompute and backward, eight more small kernels per
layer and step, which cost ~80 ms of a 7B step on the H200 (host-bound; bench/RESULTS.md,
issue 17, call 3). Gradients are cast back to the weights' dtype. The math is peft's exactly
(same function of x, A, B, W); only rounding differs (bf16 products instead of the autocast's
bf16 products in another order).

``patch_lora_layers`` swaps the forward of every peft LoRA layer it can serve (one active
adapter, no DoRA, plain or bitsandbytes-4-bit base; LoRA dropout, peft's or the shared one,
is applied here from a counter-based mask (``dropout.py``: regenerated in backward and in a
recompute, graph-safe, never stored)) and leaves the others alone; the modules, parameter
names and checkpoints stay peft's.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from tunesmith.model.fast.dropout import (
    Drop,
    SeedHome,
    add_drop_,
    apply_drop,
    attach_seed,
    dropout_p,
    rank_salt,
)
from tunesmith.model.lora_dropout import SharedInputDropout

CACHE_COPIES = True
"""Whether ``compute_copy`` caches; off while a CUDA graph is captured (``graphs.py``): the
cast must be in the graph, or its replays would read the copy of the capture's step."""
_STEPS = [0]
"""Optimizer steps taken in this process (any optimizer): part of ``compute_copy``'s key."""


def _count_step(*_: Any) -> None:
    _STEPS[0] += 1


# A fused optimizer (torch's fused AdamW, what `tunesmith sft` uses on CUDA) updates the
# parameters in place *without* moving their version counters, so the version alone would
# keep serving the first step's copy for the whole run; every optimizer step invalidates.
register_optimizer_step_post_hook(_count_step)


def _dense(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The base weight as a (out, in) matrix in ``dtype``; a bnb 4-bit one is dequantized."""
    quant_state = getattr(weight, "quant_state", None)  # bitsandbytes Params4bit only
    if quant_state is not None:
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(weight.data, quant_state).to(dtype)
    return weight if weight.dtype == dtype else weight.to(dtype)


class LoraLinearFunction(torch.autograd.Function):
    """``x @ W.T + bias + scaling * (drop(x) @ A.T) @ B.T`` with a hand-written backward.

    ``drop`` is the LoRA dropout's mask recipe (``dropout.Drop``; None: no dropout): the mask
    is regenerated in backward from it (and identically in a recompute), never stored.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        scaling: float,
        drop: Drop | None,
    ) -> torch.Tensor:
        """Forward; ``x`` is (..., in), the result (..., out) in ``x``'s dtype."""
        dtype = x.dtype
        x2 = x.reshape(-1, x.shape[-1])
        w = _dense(weight, dtype)
        # The adapter in the compute dtype with the scaling folded into A: cast once per
        # optimizer step (cached), not on every call, recompute and backward.
        a = compute_copy(lora_a, dtype, scaling)
        b = compute_copy(lora_b, dtype)
        y = torch.addmm(bias.to(dtype), x2, w.t()) if bias is not None else x2 @ w.t()
        xd = x2 if drop is None else apply_drop(x2, drop)
        xa = xd @ a.t()  # s * drop(x) A^T
        del xd
        y.addmm_(xa, b.t())
        ctx.save_for_backward(x, a, b, xa)
        # The frozen base weight is held by reference, not through save_for_backward: the
        # checkpointing hooks would hand back a detached plain tensor, losing a 4-bit weight's
        # quant_state, and a parameter needs no saving anyway.
        ctx.weight = weight
        ctx.scaling = scaling
        ctx.drop = drop
        ctx.dtypes = (lora_a.dtype, lora_b.dtype)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        """Gradients for x, A and B (the base weight and bias are frozen)."""
        x, a, b, xa = ctx.saved_tensors  # a = s * A and b = B, compute dtype
        s = ctx.scaling
        drop = ctx.drop
        dtype = x.dtype
        x2 = x.reshape(-1, x.shape[-1])
        dy2 = dy.reshape(-1, dy.shape[-1]).to(dtype)
        dyb = dy2 @ b  # (n, r)
        dx = da = db = None
        if ctx.needs_input_grad[0]:
            dx = dy2 @ _dense(ctx.weight, dtype)
            if drop is None:
                dx.addmm_(dyb, a)
            else:  # the adapter's share passes back through the same dropout mask
                add_drop_(dx, dyb @ a, drop)
            dx = dx.view(x.shape)
        if ctx.needs_input_grad[3]:
            xd = x2 if drop is None else apply_drop(x2, drop)
            da = _scaled(dyb.t() @ xd, s, ctx.dtypes[0])
        if ctx.needs_input_grad[4]:
            db = (dy2.t() @ xa).to(ctx.dtypes[1])  # xa carries the scaling already
        return dx, None, None, da, db, None, None


def compute_copy(p: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """``p * scale`` in ``dtype``, cached on ``p`` until it may have changed: an optimizer
    step (counted by a global hook: fused optimizers do not move version counters), another
    in-place change (its version counter), or a replaced storage."""
    if not CACHE_COPIES:
        with torch.no_grad():
            return p.to(dtype) if scale == 1.0 else (p * scale).to(dtype)
    key = (p.data_ptr(), p._version, _STEPS[0], dtype, scale)
    cached = getattr(p, "_tunesmith_copy", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    with torch.no_grad():
        t = p.to(dtype) if scale == 1.0 else (p * scale).to(dtype)
    p._tunesmith_copy = (key, t)  # type: ignore[attr-defined]
    return t


def _scaled(t: torch.Tensor, s: float, dtype: torch.dtype) -> torch.Tensor:
    """``t * s`` in ``dtype`` (one kernel when ``dtype`` is wider than ``t``'s)."""
    out = torch.empty(t.shape, dtype=dtype, device=t.device)
    return torch.mul(t, s, out=out)


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    drop: Drop | None = None,
) -> torch.Tensor:
    """Functional form of :class:`LoraLinearFunction` (what the patched layers call)."""
    return LoraLinearFunction.apply(x, weight, bias, lora_a, lora_b, scaling, drop)


def _fused_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    # Anything the fused path does not model (adapters switched off or merged, several or
    # mixed-batch adapters) goes through peft's own forward, unchanged.
    active = self.active_adapters
    if self.disable_adapters or self.merged or len(active) != 1 or args or kwargs:
        return type(self).forward(self, x, *args, **kwargs)
    name = active[0]
    if name not in self.lora_A:
        return type(self).forward(self, x, *args, **kwargs)
    base = self.base_layer
    p = dropout_p(self, name)
    return lora_linear(
        x,
        base.weight,
        base.bias,
        self.lora_A[name].weight,
        self.lora_B[name].weight,
        float(self.scaling[name]),
        drop=self._ts_seed.drop(p, x.device) if p > 0 else None,
    )


def fusable(module: nn.Module) -> bool:
    """Whether ``module`` is a peft LoRA layer the fused function computes exactly."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    kinds: tuple[type, ...] = (LoraLinear,)
    try:
        from peft.tuners.lora.bnb import Linear4bit

        kinds = (LoraLinear, Linear4bit)
    except ImportError:  # bitsandbytes not installed: no 4-bit layers exist either
        pass
    if not isinstance(module, kinds):
        return False
    if len(module.lora_A) != 1 or module.lora_variant:  # DoRA and friends
        return False
    dropout = next(iter(module.lora_dropout.values()))
    if type(dropout) not in (nn.Identity, nn.Dropout, SharedInputDropout):
        return False
    base = module.base_layer
    if base.weight.requires_grad:  # the function returns no gradient for the base weight
        return False
    # bnb.nn.Linear4bit subclasses nn.Linear; Conv1D-style (fan_in_fan_out) layers are not served.
    return isinstance(base, nn.Linear) and not getattr(base, "fan_in_fan_out", False)


def patch_lora_layers(model: nn.Module) -> tuple[int, int]:
    """Route every fusable peft LoRA layer through the fused function.

    Returns (patched, LoRA layers in all); layers left alone keep peft's forward.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    home = seed_home(model)
    patched = total = 0
    for module in model.modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        total += 1
        if fusable(module):
            module.forward = types.MethodType(_fused_forward, module)
            module._tunesmith_fused = True
            # Each layer's own salt; grouped layers use their first member's (one shared mask).
            module._ts_seed = SeedHome(home, rank_salt(total))
            patched += 1
    return patched, total


def seed_home(model: nn.Module) -> nn.Module:
    """The module that holds the dropout step seed: the decoder (its forward starts every
    training step's layers), else the model itself."""
    from tunesmith.model.lora import hf_model

    try:
        home = hf_model(model).get_decoder()
    except (AttributeError, NotImplementedError):
        home = model
    if not isinstance(home, nn.Module):
        home = model
    attach_seed(home)
    return home
