"""LoRA dropout cost per training step of the demo model: peft's nn.Dropout against tunesmith's
shared-mask dropout, forward and backward, at the peer recipe's mean sample length.

One decoder layer of Qwen2.5-0.5B feeds 7 LoRA layers: q/k/v read the attention input (896
wide), o the attention output (896), gate/up the MLP input (896), down the MLP activation
(4,864). peft draws 7 masks a layer; tunesmith 4 (q/k/v and gate/up share theirs). The figure
is the best of many repetitions (the machine is shared: the minimum is the least disturbed),
times 24 layers. Usage: python bench/lora_dropout_bench.py [TOKENS] [THREADS]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
from tunesmith.model.lora_dropout import SharedInputDropout

LAYERS, HIDDEN, INTER, P = 24, 896, 4864, 0.05


def one_layer(drops: list[nn.Module], inputs: list[torch.Tensor]) -> None:
    """The dropout work of one decoder layer, forward and backward."""
    outs = [d(x) for d, x in zip(drops, inputs, strict=True)]
    torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])


def best_ms(fn, reps: int = 60) -> float:
    """Minimum wall time of ``fn()`` in milliseconds."""
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def main() -> None:
    """Print the per-step dropout cost of both kinds, in bf16 and fp32."""
    tokens = int(sys.argv[1]) if len(sys.argv) > 1 else 54
    if len(sys.argv) > 2:
        torch.set_num_threads(int(sys.argv[2]))
    print(f"{tokens} tokens, {torch.get_num_threads()} threads, {LAYERS} layers, p={P}")
    for dtype in (torch.bfloat16, torch.float32):
        a, b = per_step_ms(tokens, dtype)
        name = str(dtype).removeprefix("torch.")
        print(f"  {name}: peft {a:.1f} ms/step, shared {b:.1f} ms/step ({a / b:.2f}x less)")


def per_step_ms(tokens: int, dtype: torch.dtype) -> tuple[float, float]:
    """(peft, shared) dropout milliseconds of one step: 24 layers, forward and backward."""
    attn_in, attn_out, mlp_in = (
        torch.randn(tokens, HIDDEN, dtype=dtype, requires_grad=True) for _ in range(3)
    )
    act = torch.randn(tokens, INTER, dtype=dtype, requires_grad=True)
    inputs = [attn_in, attn_in, attn_in, attn_out, mlp_in, mlp_in, act]
    # peft: one nn.Dropout per LoRA layer, each draws its own mask
    peft = [nn.Dropout(P).train() for _ in range(7)]
    # tunesmith: one module per parent; the same input tensor reuses the mask
    attn, mlp = SharedInputDropout(P).train(), SharedInputDropout(P).train()

    def shared_layer() -> None:
        one_layer([attn] * 4 + [mlp] * 3, inputs)
        attn.clear()
        mlp.clear()

    return best_ms(lambda: one_layer(peft, inputs)) * LAYERS, best_ms(shared_layer) * LAYERS


if __name__ == "__main__":
    main()
