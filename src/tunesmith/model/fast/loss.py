"""Cross-entropy of a frozen linear head without materialising the (tokens x vocab) logits.

``linear_cross_entropy(h, W, t)`` returns the summed loss and the number of correct argmax
predictions of ``h @ W.T`` against targets ``t``. The rows are processed ``chunk`` at a time:
each chunk's logits are formed in fp32, reduced to loss terms, turned into the gradient
``softmax - onehot`` in place and multiplied back by ``W`` at once, so the forward already
holds d(loss)/dh and the backward only scales it. Peak extra memory is one chunk of fp32
logits (``chunk x vocab x 4`` bytes) instead of the whole matrix in bf16 and fp32 plus its
gradient, and the head's GEMM runs once per step instead of twice (plus a recompute) — the
idea of Liger's fused linear cross-entropy, written here for a frozen head and label-only rows.
"""

from __future__ import annotations

from typing import Any

import torch

# Rows per chunk: about 2**25 logits (128 MiB of fp32; 192 rows of a 152k vocab) at most, at
# least 64 rows: large enough for an efficient GEMM, small beside a 7B model's activations.
CHUNK_ELEMENTS = 2**25


def default_chunk(vocab: int) -> int:
    """Rows per chunk for a head of ``vocab`` outputs."""
    return max(64, CHUNK_ELEMENTS // max(1, vocab) // 64 * 64)


class LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``h @ weight.T`` (frozen ``weight``) and the correct count."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        h: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        chunk: int,
        need_grad: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss sum in fp32, correct predictions); d(loss)/dh too when ``need_grad``."""
        w = weight if weight.dtype == h.dtype else weight.to(h.dtype)
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        correct = torch.zeros((), dtype=torch.long, device=h.device)
        grad_h = torch.empty_like(h) if need_grad else None
        for s in range(0, h.shape[0], chunk):
            t = targets[s : s + chunk]
            logits = (h[s : s + chunk] @ w.t()).float()
            correct += (logits.argmax(-1) == t).sum()
            lse = torch.logsumexp(logits, dim=-1)
            loss += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if grad_h is not None:
                # softmax - onehot, in place in the logits' buffer.
                probs = logits.sub_(lse[:, None]).exp_()
                probs[torch.arange(t.shape[0], device=t.device), t] -= 1.0
                torch.mm(probs.to(h.dtype), w, out=grad_h[s : s + chunk])
        ctx.save_for_backward(grad_h if grad_h is not None else h.new_empty(0))
        ctx.mark_non_differentiable(correct)
        return loss, correct

    @staticmethod
    def backward(ctx: Any, dloss: torch.Tensor, _dcorrect: Any) -> tuple[Any, ...]:  # type: ignore[override]
        """d(loss)/dh times the incoming scalar gradient."""
        (grad_h,) = ctx.saved_tensors
        return grad_h * dloss.to(grad_h.dtype), None, None, None, None


def linear_cross_entropy(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed token loss and correct-prediction count of a frozen head ``weight`` on ``h``.

    ``h`` is (n, hidden), ``targets`` (n,) with no ignored positions (select them first).
    """
    if weight.requires_grad:
        raise ValueError("linear_cross_entropy serves a frozen head only")
    # Inside Function.forward grad mode is off: decide here whether a gradient is wanted.
    need_grad = h.requires_grad and torch.is_grad_enabled()
    chunk = chunk or default_chunk(weight.shape[0])
    return LinearCrossEntropy.apply(h, weight, targets, chunk, need_grad)
