"""Frozen base weights prepacked for the CPU GEMM library vs plain ``F.linear``, recipe shapes.

LoRA never changes the base weights, so they could be packed once for oneDNN
(``torch.ops.mkldnn._reorder_linear_weight`` / ``_linear_pointwise``, inductor's bf16 CPU path)
or MKL (``torch.ops.mkl._mkl_reorder_linear_weight`` / ``_mkl_linear``, inductor's fp32 path).
A training step needs ``x @ W.T`` (forward) and ``dy @ W`` (backward, the input gradient):
the second one is a linear with ``W.T`` as the weight, i.e. a second packed copy.

For every projection of the demo model (Qwen2.5-0.5B: hidden 896, intermediate 4864, kv 128)
at M tokens, one decoder layer's worth of forward and backward matmuls is timed with each
method (best of ``--repeat`` runs of ``--iters`` calls, same process, same threads) and
checked against ``F.linear`` (max relative error printed). Also times fp32 under
``torch.backends.mkldnn`` flags and thread settings when asked.

Usage: python bench/cpu_packed_matmul.py [--tokens 32 54 120] [--dtypes bf16 fp32]
                                         [--threads N] [--iters 20] [--repeat 5]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

# (name, out, in) of the demo model's linear layers, one decoder layer.
SHAPES = (
    ("q", 896, 896),
    ("k", 128, 896),
    ("v", 128, 896),
    ("o", 896, 896),
    ("gate", 4864, 896),
    ("up", 4864, 896),
    ("down", 896, 4864),
)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def best(fn: Callable[[], object], iters: int, repeat: int) -> float:
    """Best mean seconds per call over ``repeat`` runs of ``iters`` calls (after a warm-up)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        times.append((time.perf_counter() - t) / iters)
    return min(times)


def methods(dtype: torch.dtype, m: int) -> dict[str, Callable[[torch.Tensor], Callable]]:
    """Per method: weight (out, in) -> a function x -> x @ weight.T (packing done up front)."""
    out: dict[str, Callable[[torch.Tensor], Callable]] = {
        "F.linear": lambda w: lambda x: F.linear(x, w),
    }

    def onednn(w: torch.Tensor, batch: int | None) -> Callable:
        packed = torch.ops.mkldnn._reorder_linear_weight(w, batch)
        return lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")

    out["onednn dense"] = lambda w: (
        lambda x: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
    )
    out["onednn packed (M)"] = lambda w: onednn(w, m)
    out["onednn packed (any M)"] = lambda w: onednn(w, None)
    if dtype == torch.float32:

        def mkl(w: torch.Tensor) -> Callable:
            packed = torch.ops.mkl._mkl_reorder_linear_weight(w, m)
            return lambda x: torch.ops.mkl._mkl_linear(x, packed, w, None, m)

        out["mkl packed (M)"] = mkl
    return out


def run(dtype_name: str, m: int, iters: int, repeat: int) -> None:
    """Time one decoder layer's forward (x @ W.T) and backward (dy @ W) matmuls per method."""
    dtype = DTYPES[dtype_name]
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(o, i, generator=g).div_(i**0.5).to(dtype) for _, o, i in SHAPES]
    xs = [torch.randn(m, i, generator=g).to(dtype) for _, o, i in SHAPES]
    dys = [torch.randn(m, o, generator=g).to(dtype) for _, o, i in SHAPES]
    flop = sum(2 * m * o * i for _, o, i in SHAPES)
    ref_f = [F.linear(x, w) for x, w in zip(xs, ws, strict=True)]
    ref_b = [dy @ w for dy, w in zip(dys, ws, strict=True)]
    base: dict[str, float] = {}
    for name, make in methods(dtype, m).items():
        try:
            fwd = [make(w) for w in ws]
            bwd = [make(w.t().contiguous()) for w in ws]
            err = max(
                float((f(x).float() - r.float()).abs().max() / r.float().abs().max())
                for f, x, r in zip(fwd + bwd, xs + dys, ref_f + ref_b, strict=True)
            )
        except RuntimeError as e:
            print(f"{dtype_name} M={m:4d} {name:24s} failed: {str(e).splitlines()[0][:80]}")
            continue
        tf = best(lambda fwd=fwd: [f(x) for f, x in zip(fwd, xs, strict=True)], iters, repeat)
        tb = best(lambda bwd=bwd: [f(d) for f, d in zip(bwd, dys, strict=True)], iters, repeat)
        base.setdefault("f", tf)
        base.setdefault("b", tb)
        rate_f, rate_b = flop / tf / 1e9, flop / tb / 1e9
        print(
            f"{dtype_name} M={m:4d} {name:22s} fwd {tf * 1e3:7.3f} ms ({rate_f:5.1f} GFLOP/s,"
            f" x{base['f'] / tf:4.2f})  bwd {tb * 1e3:7.3f} ms ({rate_b:5.1f} GFLOP/s,"
            f" x{base['b'] / tb:4.2f})  max rel err {err:.1e}",
            flush=True,
        )


def main() -> None:
    """Parse the arguments and print one line per dtype, token count and method."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[32, 54, 120])
    ap.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=sorted(DTYPES))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for d in args.dtypes:
        for m in args.tokens:
            run(d, m, args.iters, args.repeat)


if __name__ == "__main__":
    main()
