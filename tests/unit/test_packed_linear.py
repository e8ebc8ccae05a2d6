"""Prepacked frozen base weights (oneDNN): the grouped LoRA function's outputs and gradients
equal the plain path's, and a changed weight is packed again."""

from __future__ import annotations

import copy

import pytest
import torch
from test_lora_cpu import _peft as lora_model
from test_lora_cpu import _run

from tunesmith.model import packed_linear
from tunesmith.model.lora_cpu import group_lora_layers
from tunesmith.model.lora_dropout import share_lora_dropout

DTYPES = [torch.float32, torch.bfloat16]


def _skip_unless_available(dtype: torch.dtype) -> None:
    if not packed_linear.available(dtype):
        pytest.skip(f"oneDNN cannot pack {dtype} on this CPU/build")


def _peft(dtype: torch.dtype, dropout: float):
    model = lora_model(dropout, dtype)
    share_lora_dropout(model)
    return model.train()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_packed_equals_plain_outputs_and_gradients(dtype: torch.dtype, dropout: float) -> None:
    _skip_unless_available(dtype)
    ids = torch.randint(3, 200, (2, 12))
    plain = _peft(dtype, dropout)
    ours = copy.deepcopy(plain)
    group_lora_layers(plain)
    group_lora_layers(ours, pack=True)
    out_p, grads_p = _run(plain, ids)
    out_o, grads_o = _run(ours, ids)
    layers = [m for m in ours.modules() if hasattr(m, "_tunesmith_packed")]
    assert len(layers) == 7 * len(ours.get_base_model().model.layers)  # every base was packed
    # The same math; only the GEMM library's summation order differs.
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(out_o, out_p, **tol)
    assert grads_o.keys() == grads_p.keys()
    for n, g in grads_p.items():
        assert grads_o[n].dtype == g.dtype
        if dtype == torch.float32:
            torch.testing.assert_close(grads_o[n], g, rtol=1e-3, atol=1e-6, msg=n)
        else:
            cos = torch.nn.functional.cosine_similarity(
                grads_o[n].float().flatten(), g.float().flatten(), dim=0
            )
            assert cos > 0.99, n


def test_a_changed_weight_is_packed_again() -> None:
    _skip_unless_available(torch.float32)
    layer = torch.nn.Linear(16, 8, bias=False).requires_grad_(False)
    x = torch.randn(3, 16)
    first = packed_linear.packed(layer, torch.float32)
    assert packed_linear.packed(layer, torch.float32) is first  # kept on the layer
    torch.testing.assert_close(packed_linear.linear(x, first.fwd, None), x @ layer.weight.t())
    dy = torch.randn(3, 8)
    torch.testing.assert_close(packed_linear.linear(dy, first.bwd, None), dy @ layer.weight)
    layer.weight.mul_(2)  # edited in place: a new version
    again = packed_linear.packed(layer, torch.float32)
    assert again is not first
    torch.testing.assert_close(packed_linear.linear(x, again.fwd, None), x @ layer.weight.t())


def test_trainable_base_weights_are_not_packed() -> None:
    """A base weight that trains (not LoRA's case) must never be read from a stale pack."""
    model = _peft(torch.float32, 0.0)
    base = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    base.weight.requires_grad_(True)
    group_lora_layers(model, pack=True)
    with torch.no_grad():
        model(input_ids=torch.randint(3, 200, (1, 6)))
    assert not hasattr(base, "_tunesmith_packed")
