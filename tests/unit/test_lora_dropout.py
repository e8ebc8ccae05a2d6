"""The shared LoRA dropout: peft's expectation and variance, one mask per input, exact at p=0."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from tiny import build_tiny_model
from tunesmith.model.lora import lora_config
from tunesmith.model.lora_dropout import (
    SharedInputDropout,
    keep_mask,
    quantized_p,
    share_lora_dropout,
)
from tunesmith.options import LoraOptions

P = 0.05
N = 400_000  # elements per statistical sample: the z-scores below have sd ~ 1


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _z(observed: float, expected: float, sd: float) -> float:
    return abs(observed - expected) / sd


def test_keep_mask_rate_and_lanes_are_uniform() -> None:
    torch.manual_seed(0)
    m = keep_mask(torch.Size([N]), P, torch.device("cpu"))
    p = quantized_p(P)
    assert abs(p - P) < 1 / 65536
    drop = (~m).double()
    assert _z(float(drop.mean()), p, math.sqrt(p * (1 - p) / N)) < 4
    # Each of the four 16-bit lanes of a 64-bit word is an independent uniform draw.
    lanes = drop.view(-1, 4).mean(0)
    for rate in lanes.tolist():
        assert _z(rate, p, math.sqrt(p * (1 - p) / (N / 4))) < 4
    # Neighbouring elements (same word) are uncorrelated.
    a, b = drop.view(-1, 4)[:, 0], drop.view(-1, 4)[:, 1]
    assert abs(float(torch.corrcoef(torch.stack([a, b]))[0, 1])) < 4 / math.sqrt(N / 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_same_mean_and_variance_as_peft_dropout(dtype: torch.dtype) -> None:
    """Unbiased (mean = x) with the variance x^2 p / (1 - p), like nn.Dropout."""
    torch.manual_seed(1)
    x = torch.full((N,), 1.5, dtype=dtype)
    ours = SharedInputDropout(P).train()(x).double()
    theirs = nn.Dropout(P).train()(x.float()).double()
    p = quantized_p(P)
    var = 1.5**2 * p / (1 - p)
    for out in (ours, theirs):
        assert _z(float(out.mean()), 1.5, math.sqrt(var / N)) < 4
        # sd of a sample variance of a two-point distribution: sqrt((mu4 - var^2) / N)
        mu4 = var**2 * ((1 - p) ** 3 + p**3) / (p * (1 - p))
        assert _z(float(out.var()), var, math.sqrt((mu4 - var**2) / N)) < 4
    # Dropped elements are exactly 0, kept ones exactly x / (1 - p) (rounded once to dtype).
    kept = float(torch.tensor(1.5, dtype=dtype) * (1 / (1 - p)))
    values = set(ours.unique().tolist())
    assert values == {0.0, kept}


def test_one_mask_per_input_tensor_and_a_new_one_per_call() -> None:
    drop = SharedInputDropout(0.5).train()
    x = torch.ones(64, 32)
    a, b = drop(x), drop(x)
    assert b is a  # the same input again: the same mask
    x.mul_(1)  # modified in place: a new mask
    c = drop(x)
    assert not torch.equal(c, a)
    drop.clear()
    assert not torch.equal(drop(x), c)
    assert torch.equal(drop.eval()(x), x)
    assert torch.equal(SharedInputDropout(1e-7).train()(x), x)  # rounds to p' = 0: identity


def _peft(dropout: float, seed: int = 0):
    from peft import get_peft_model

    from tiny import build_tiny_tokenizer

    torch.manual_seed(seed)
    base = build_tiny_model(build_tiny_tokenizer(), seed=0)
    cfg = lora_config(LoraOptions(rank=4, alpha=8, dropout=dropout))
    model = get_peft_model(base, cfg)
    for n, p in model.named_parameters():  # non-zero B, so the adapters change the output
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    return model


def test_projections_reading_one_input_share_its_mask() -> None:
    model = _peft(0.3)
    assert share_lora_dropout(model) == len(
        [m for m in model.modules() if m.__class__.__name__ == "Linear" and hasattr(m, "lora_A")]
    )
    attn = model.get_base_model().model.layers[0].self_attn
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        getattr(attn, k)
        .lora_A["default"]
        .register_forward_hook(lambda _m, args, _o, k=k: seen.__setitem__(k, args[0]))
        for k in ("q_proj", "k_proj", "v_proj", "o_proj")
    ]
    model.train()
    ids = torch.randint(3, 200, (1, 24))
    model(input_ids=ids).logits.sum().backward()
    for h in hooks:
        h.remove()
    assert seen["q_proj"] is seen["k_proj"] is seen["v_proj"]  # one dropped tensor
    assert seen["o_proj"] is not seen["q_proj"]
    zeros = seen["q_proj"] == 0
    assert 0 < float(zeros.float().mean()) < 0.6
    # The cache is gone once the attention block returned.
    assert attn.q_proj.lora_dropout["default"]._out is None


def test_dropout_zero_and_eval_are_exactly_peft() -> None:
    """p = 0: peft's Identity stays; p > 0 in eval mode: outputs and gradients are peft's."""
    ids = torch.randint(3, 200, (2, 16))
    zero = _peft(0.0)
    assert share_lora_dropout(zero) == 0
    theirs = _peft(0.1)
    ours = copy.deepcopy(theirs)
    assert share_lora_dropout(ours) > 0
    for m in (theirs, ours):
        m.eval()
    out_t, out_o = theirs(input_ids=ids).logits, ours(input_ids=ids).logits
    assert torch.equal(out_t, out_o)
    out_t.square().sum().backward()
    out_o.square().sum().backward()
    grads_t = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    for n, p in ours.named_parameters():
        if p.requires_grad:
            assert torch.equal(p.grad, grads_t[n]), n


def test_training_is_reproducible_from_the_torch_seed() -> None:
    model = _peft(0.2)
    share_lora_dropout(model)
    model.train()
    ids = torch.randint(3, 200, (1, 20))
    torch.manual_seed(7)
    a = model(input_ids=ids).logits
    torch.manual_seed(7)
    b = model(input_ids=ids).logits
    torch.manual_seed(8)
    c = model(input_ids=ids).logits
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
