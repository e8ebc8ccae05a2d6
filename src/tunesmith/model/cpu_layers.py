"""The frozen parts of a Qwen2/Llama decoder layer as single autograd functions, on the CPU.

At the peers' recipe (~53 tokens a step) a CPU LoRA step spends more time in PyTorch's
per-operator cost than in the arithmetic of everything outside the matmuls: HF's eager
attention is ~25 operators and ~20 autograd nodes a layer (RoPE by ``rotate_half``,
``repeat_kv``, scale, mask, fp32 softmax, casts), RMSNorm ~8 and SiLU·mul 3. With the base
weights frozen none of them has parameters to train, so each is one ``torch.autograd.Function``
here with a hand-written backward that saves only what it needs (``--cpu_fast layers``):

- ``RmsNorm``: aten's fused RMSNorm kernel (one op forward, one backward, fp32 inside);
- ``Attention``: RoPE on q and k (``x·cos + roll(x)·sin'``, three ops), grouped-query
  attention WITHOUT ``repeat_kv`` (the query heads of one kv head stacked as rows of one
  ``bmm``), additive mask, fp32 softmax, ``P @ V``; backward by hand;
- ``SiluMul``: ``silu(gate) * up``.

The math is HF's; the rounding differs only where HF rounds an intermediate to bf16 that is
kept in fp32 here (RMSNorm before the weight, the attention scores before the mask).
Anything outside the modelled case (a KV cache, attention dropout, a sliding window, a
boolean mask, a trainable norm weight) goes through HF's forward; ``FusedLayers.enabled``
switches the whole thing at run time (the one-process A/B: ``bench/cpu_pack_ab.py --switch
layers``).
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


class RmsNorm(torch.autograd.Function):
    """``weight * x / rms(x)`` for a frozen ``weight`` (fp32 statistics, one kernel forward).

    Backward (aten has no CPU kernel for it), with ``r = 1/rms(x)`` and ``g = dy * weight``
    in fp32: ``dx = r*g - x * r**3 * mean(g*x)``.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:  # type: ignore[override]
        """The normalised ``x`` in ``x``'s dtype."""
        y, rstd = torch.ops.aten._fused_rms_norm(x, [x.shape[-1]], weight, eps)
        ctx.save_for_backward(x, rstd, weight)
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        """The input's gradient only (the weight is frozen)."""
        x, rstd, weight = ctx.saved_tensors
        g = dy * weight.float()  # fp32 (type promotion), as HF's backward computes
        coef = (g * x).mean(-1, keepdim=True).mul_(rstd.pow(3))
        dx = torch.addcmul(g.mul_(rstd), x, coef, value=-1)
        return dx.to(x.dtype), None, None


class SiluMul(torch.autograd.Function):
    """``silu(gate) * up`` (the SwiGLU MLP's middle)."""

    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """The product, in the inputs' dtype."""
        act = torch.nn.functional.silu(gate)
        ctx.save_for_backward(gate, up, act)
        return act * up

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        """Gradients of ``gate`` and ``up``."""
        gate, up, act = ctx.saved_tensors
        dgate = torch.ops.aten.silu_backward(dy * up, gate)
        return dgate, dy * act


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` as ``x * cos + roll(x) * sin``, where ``sin`` is the
    signed ``cat(-sin1, sin2)`` (``rotate_half(x) = cat(-x2, x1)``); its transpose, for the
    backward, is the same with ``roll(sin)`` (a half-roll is its own inverse)."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin)


class Attention(torch.autograd.Function):
    """Causal grouped-query attention with RoPE, from the q/k/v projections' outputs.

    ``q`` (B, T, H·D), ``k``/``v`` (B, T, Hk·D); ``cos``/``sin`` (B, T, D) as HF's rotary
    embedding gives them with ``sin`` signed (``_rope``) and ``sin_back`` its half-roll;
    ``mask`` additive (B, 1, T, T) or None (causal). Returns (B, T, H·D).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        sin_back: torch.Tensor,
        mask: torch.Tensor | None,
        scaling: float,
        head_dim: int,
    ) -> torch.Tensor:
        """The attention output before ``o_proj``."""
        b, t, _ = q.shape
        d = head_dim
        h, hk = q.shape[-1] // d, k.shape[-1] // d
        g = h // hk
        c, s = cos.unsqueeze(2), sin.unsqueeze(2)
        qr = _rope(q.view(b, t, h, d), c, s)
        kr = _rope(k.view(b, t, hk, d), c, s)
        # The G query heads of one kv head as G·T rows: (B, Hk, G·T, D), no repeat_kv.
        qg = qr.view(b, t, hk, g, d).permute(0, 2, 3, 1, 4).reshape(b, hk, g * t, d)
        kh = kr.transpose(1, 2)  # (B, Hk, T, D), a view
        vh = v.view(b, t, hk, d).transpose(1, 2)
        scores = torch.matmul(qg, kh.transpose(-1, -2)).view(b, hk, g, t, t)
        # (B, 1, 1, T, T) against the scores' (B, Hk, G, T, T)
        mask = _causal(t, scores.dtype) if mask is None else mask.unsqueeze(2)
        acc = torch.promote_types(scores.dtype, torch.float32)  # fp32 softmax, as HF's
        probs = torch.softmax(torch.add(mask, scores, alpha=scaling), -1, dtype=acc)
        p = probs.to(v.dtype).view(b, hk, g * t, t)
        out = torch.matmul(p, vh)  # (B, Hk, G·T, D)
        ctx.save_for_backward(qg, kh, vh, probs, p, cos, sin_back)
        ctx.scaling, ctx.shape = scaling, (b, t, h, hk, g, d)
        return out.view(b, hk, g, t, d).permute(0, 3, 1, 2, 4).reshape(b, t, h * d)

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        """Gradients of q, k and v."""
        qg, kh, vh, probs, p, cos, sin_back = ctx.saved_tensors
        b, t, h, hk, g, d = ctx.shape
        do = dout.view(b, t, hk, g, d).permute(0, 2, 3, 1, 4).reshape(b, hk, g * t, d)
        dv = torch.matmul(p.transpose(-1, -2), do)  # (B, Hk, T, D): summed over the group
        dp = torch.matmul(do, vh.transpose(-1, -2)).view(probs.shape)
        ds = torch.ops.aten._softmax_backward_data(dp.to(probs.dtype), probs, -1, probs.dtype)
        ds = ds.mul_(ctx.scaling).to(qg.dtype).view(b, hk, g * t, t)
        dqg = torch.matmul(ds, kh)  # (B, Hk, G·T, D)
        dkh = torch.matmul(ds.transpose(-1, -2), qg)  # (B, Hk, T, D)
        c, s = cos.unsqueeze(2), sin_back.unsqueeze(2)
        dqr = dqg.view(b, hk, g, t, d).permute(0, 3, 1, 2, 4).reshape(b, t, h, d)
        dq = _rope(dqr, c, s).reshape(b, t, h * d)
        dk = _rope(dkh.transpose(1, 2), c, s).reshape(b, t, hk * d)
        dv = dv.transpose(1, 2).reshape(b, t, hk * d)
        return dq, dk, dv, None, None, None, None, None, None


def _causal(t: int, dtype: torch.dtype) -> torch.Tensor:
    """An additive causal mask (T, T) with the dtype's lowest value above the diagonal."""
    return torch.full((t, t), torch.finfo(dtype).min, dtype=dtype).triu_(1)


@dataclass
class FusedLayers:
    """The switch shared by every patched module and the signed RoPE table of the step."""

    enabled: bool = True
    """Use the fused functions (False: HF's forwards, for an A/B in one process)."""
    _sin_src: torch.Tensor | None = None  # held, so its identity cannot be reused
    _sin_version: int = -1
    _sin: tuple[torch.Tensor, torch.Tensor] | None = None

    def signed_sin(self, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``cat(-sin1, sin2)`` and its half-roll for HF's ``sin``, made once per forward
        (every layer gets the same tensor from the model's rotary embedding)."""
        if self._sin is None or self._sin_src is not sin or self._sin_version != sin._version:
            half = sin.shape[-1] // 2
            signed = torch.cat((-sin[..., :half], sin[..., half:]), -1)
            self._sin = (signed, signed.roll(half, -1))
            self._sin_src, self._sin_version = sin, sin._version
        return self._sin


def _norm_forward(self: Any, hidden_states: torch.Tensor) -> torch.Tensor:
    if not self._tunesmith_fused.enabled or self.weight.requires_grad:
        return type(self).forward(self, hidden_states)
    return RmsNorm.apply(hidden_states, self.weight, self.variance_epsilon)


def _mlp_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    if not self._tunesmith_fused.enabled:
        return type(self).forward(self, x)
    return self.down_proj(SiluMul.apply(self.gate_proj(x), self.up_proj(x)))


def _attn_forward(
    self: Any,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    attention_mask: torch.Tensor | None,
    *args: Any,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    fused = self._tunesmith_fused
    cache = kwargs.get("cache", kwargs.get("past_key_values", args[0] if args else None))
    plain = (
        not fused.enabled
        or cache is not None
        or (self.training and self.attention_dropout > 0)
        or getattr(self, "sliding_window", None) is not None
        or (attention_mask is not None and (attention_mask.dtype == torch.bool
                                            or attention_mask.shape[1] != 1))
    )  # fmt: skip
    if plain:
        return type(self).forward(
            self, hidden_states, position_embeddings, attention_mask, *args, **kwargs
        )
    cos, sin = position_embeddings
    sin, sin_back = fused.signed_sin(sin)
    q, k, v = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
    out = Attention.apply(q, k, v, cos, sin, sin_back, attention_mask, self.scaling, self.head_dim)
    return self.o_proj(out), None


def _patchable(module: nn.Module) -> str | None:
    """Which part of a decoder layer ``module`` is ("norm", "mlp", "attn"), by shape of its
    forward's inputs as HF's Qwen2/Llama modules define them; None for anything else."""
    name = type(module).__name__
    if name.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
        return "norm"
    if name.endswith("MLP") and type(getattr(module, "act_fn", None)).__name__ in (
        "SiLU", "SiLUActivation"
    ):  # fmt: skip
        return "mlp"
    if name in ("Qwen2Attention", "LlamaAttention") and hasattr(module, "head_dim"):
        return "attn"
    return None


def fuse_decoder_layers(model: nn.Module) -> tuple[FusedLayers, dict[str, int]]:
    """Route the RMSNorms, SwiGLU MLPs and attentions of a Qwen2/Llama model (peft-wrapped or
    not) through the fused functions; the shared switch and how many of each were patched.
    No parameter is replaced; the patched forwards fall back to HF's where not modelled."""
    fused = FusedLayers()
    counts = {"norm": 0, "mlp": 0, "attn": 0}
    forwards = {"norm": _norm_forward, "mlp": _mlp_forward, "attn": _attn_forward}
    for module in model.modules():
        part = _patchable(module)
        if part is None:
            continue
        module._tunesmith_fused = fused
        module.forward = types.MethodType(forwards[part], module)
        counts[part] += 1
    return fused, counts
