"""The Triton kernel of ``dropout.py`` (imported only where Triton is installed).

``out = keep * x * scale (+ acc)`` with ``keep`` from the counter-based hash that
``dropout.keep_mask`` computes in plain PyTorch: the same uint32 arithmetic, bit for bit.
The seed is read from device memory, so a CUDA graph that captured the launch still draws
the current step's mask on every replay.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _fmix(h):  # type: ignore[no-untyped-def]
    # murmur3's 32-bit finaliser (uint32 wrap-around arithmetic)
    h ^= h >> 16
    h *= 0x85EBCA6B
    h ^= h >> 13
    h *= 0xC2B2AE35
    h ^= h >> 16
    return h


@triton.jit
def drop_kernel(x_ptr, acc_ptr, out_ptr, seed_ptr, salt_mix, thr, scale, n,  # type: ignore[no-untyped-def]
                ACC: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """One block of ``BLOCK`` elements of the flattened tensors."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    seed = tl.load(seed_ptr).to(tl.uint32)
    key = _fmix(seed ^ salt_mix)
    h = _fmix((offs.to(tl.uint32) * 0x27D4EB2F) ^ key)
    keep = h.to(tl.int64) >= thr
    y = tl.where(keep, tl.load(x_ptr + offs, mask=inside).to(tl.float32) * scale, 0.0)
    if ACC:
        y += tl.load(acc_ptr + offs, mask=inside).to(tl.float32)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=inside)
