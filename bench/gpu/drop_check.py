"""Issue 17, session 6: the LoRA dropout kernel on the GPU (model/fast/dropout.py).

The Triton kernel against the PyTorch reference (same mask bit for bit; values to bf16
rounding), inside a CUDA graph (a replay after the seed changed draws the new mask), and
its time at the 7B shapes against the bytes it must move. Usage: python3 bench/gpu/drop_check.py
"""

from __future__ import annotations

import torch
import triton.testing

from tunesmith.model.fast.dropout import Drop, add_drop_, apply_drop, drop_reference

seed = torch.tensor([987654321], dtype=torch.int64, device="cuda")
for n, k in ((2048, 3584), (2048, 18944)):
    x = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    d = Drop(seed, 5, 0.05)
    got, want = apply_drop(x, d), drop_reference(x, d)
    same_mask = torch.equal(got == 0, want == 0)
    err = float((got.float() - want.float()).abs().max())
    acc = torch.randn_like(x)
    got2 = add_drop_(acc.clone(), x, d)
    err2 = float((got2.float() - drop_reference(x, d, acc).float()).abs().max())
    ms = triton.testing.do_bench(lambda: apply_drop(x, d), return_mode="median")  # noqa: B023
    ms2 = triton.testing.do_bench(lambda: add_drop_(acc, x, d), return_mode="median")  # noqa: B023
    gb = x.numel() * 2 * 2 / 1e9  # read x, write out; GB per ms = TB/s
    print(f"({n}, {k}) bf16: same mask {same_mask}, max |diff| {err:.3g} (acc {err2:.3g}), "
          f"kept {float((got != 0).float().mean()):.4f}; apply {ms * 1e3:.1f} us "
          f"({gb / ms:.2f} TB/s), add {ms2 * 1e3:.1f} us ({gb * 1.5 / ms2:.2f} TB/s)")  # fmt: skip

# Inside a CUDA graph: the replay reads the seed from device memory.
x = torch.randn(2048, 3584, device="cuda", dtype=torch.bfloat16)
d = Drop(seed, 9, 0.05)
apply_drop(x, d)
g = torch.cuda.CUDAGraph()
s = torch.cuda.Stream()
s.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(s), torch.cuda.graph(g):
    out = apply_drop(x, d)
torch.cuda.current_stream().wait_stream(s)
g.replay()
first = out.clone()
ok_first = torch.equal(first == 0, drop_reference(x, d) == 0)
seed.random_(0, 2**31 - 1)
g.replay()
ok_new = torch.equal(out == 0, drop_reference(x, d) == 0)
print(f"graph replay: the seed's mask {ok_first}; after a new seed: its mask {ok_new}, "
      f"a different one {not torch.equal(out, first)}")  # fmt: skip
