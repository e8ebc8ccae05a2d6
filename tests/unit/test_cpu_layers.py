"""The fused decoder-layer functions (``--cpu_fast layers``) and the prepacked LM head (``head``):
each function against plain torch (forward and gradients), the tiny Qwen2 against HF's."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from tiny import build_tiny_model, build_tiny_tokenizer
from tunesmith.model import cpu_layers
from tunesmith.model.cpu_layers import Attention, RmsNorm, SiluMul, fuse_decoder_layers
from tunesmith.model.lora import lora_config
from tunesmith.model.lora_cpu import group_lora_layers
from tunesmith.model.packed_linear import available, pack_head
from tunesmith.options import LoraOptions


def _grads(fn, *inputs: torch.Tensor, seed: int = 1) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``fn``'s output and the gradients of a random projection of it."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*leaves)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    (out * weight).sum().backward()
    return out.detach(), [x.grad for x in leaves]


def _close(ours, theirs, **tol) -> None:
    torch.testing.assert_close(ours[0], theirs[0], **tol)
    for a, b in zip(ours[1], theirs[1], strict=True):
        torch.testing.assert_close(a, b, **tol)


def test_rms_norm_matches_plain_torch() -> None:
    x = torch.randn(2, 5, 32, dtype=torch.float64) * 3
    w = torch.rand(32, dtype=torch.float64) + 0.5

    def plain(x: torch.Tensor) -> torch.Tensor:
        return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    _close(_grads(lambda x: RmsNorm.apply(x, w, 1e-6), x), _grads(plain, x))


def test_silu_mul_matches_plain_torch() -> None:
    g, u = torch.randn(3, 40, dtype=torch.float64), torch.randn(3, 40, dtype=torch.float64)
    _close(_grads(SiluMul.apply, g, u), _grads(lambda g, u: F.silu(g) * u, g, u))


def _hf_attention(q, k, v, cos, sin, mask, scaling: float, d: int) -> torch.Tensor:
    """HF's eager path: rotate_half RoPE, repeat_kv, scale, mask, fp32 softmax, P @ V."""
    b, t, _ = q.shape
    q, k, v = (z.view(b, t, -1, d).transpose(1, 2) for z in (q, k, v))

    def rot(x: torch.Tensor) -> torch.Tensor:
        return torch.cat((-x[..., d // 2 :], x[..., : d // 2]), -1)

    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    q, k = q * c + rot(q) * s, k * c + rot(k) * s
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = q @ k.transpose(2, 3) * scaling + mask
    p = torch.softmax(scores, -1, dtype=torch.promote_types(q.dtype, torch.float32)).to(q.dtype)
    return (p @ v).transpose(1, 2).reshape(b, t, -1)


@pytest.mark.parametrize("heads", [(4, 2), (3, 3), (4, 1)])
def test_attention_matches_hf_eager_math(heads: tuple[int, int]) -> None:
    """RoPE by roll, grouped-query attention without repeat_kv, a padded causal mask."""
    h, hk = heads
    b, t, d = 2, 7, 8
    dt = torch.float64
    q, k, v = (torch.randn(b, t, n * d, dtype=dt) for n in (h, hk, hk))
    ang = torch.arange(t, dtype=dt)[:, None] * torch.rand(d // 2, dtype=dt)
    cos = torch.cat((ang, ang), -1).cos().expand(b, t, d)
    sin = torch.cat((ang, ang), -1).sin().expand(b, t, d)
    allowed = torch.ones(t, t, dtype=torch.bool).tril().expand(b, 1, t, t).clone()
    allowed[1, :, :, :2] = False  # the second row left-padded by two tokens
    causal = torch.zeros(t, t, dtype=dt).masked_fill(~allowed[0, 0], torch.finfo(dt).min)
    mask = torch.zeros(b, 1, t, t, dtype=dt).masked_fill(~allowed, torch.finfo(dt).min)
    signed = torch.cat((-sin[..., : d // 2], sin[..., d // 2 :]), -1)
    back = signed.roll(d // 2, -1)

    def ours(q, k, v):
        return Attention.apply(q, k, v, cos, signed, back, mask, d**-0.5, d)

    def theirs(q, k, v):
        return _hf_attention(q, k, v, cos, sin, mask, d**-0.5, d)

    _close(_grads(ours, q, k, v), _grads(theirs, q, k, v))
    # No mask: causal.
    _close(
        _grads(lambda q, k, v: Attention.apply(q, k, v, cos, signed, back, None, 0.3, d), q, k, v),
        _grads(lambda q, k, v: _hf_attention(q, k, v, cos, sin, causal, 0.3, d), q, k, v),
    )


def _peft(dtype: torch.dtype = torch.float32):
    from peft import get_peft_model

    torch.manual_seed(0)
    base = build_tiny_model(build_tiny_tokenizer(), seed=0).to(dtype)
    base.config._attn_implementation = "eager"
    model = get_peft_model(base, lora_config(LoraOptions(rank=4, alpha=8, dropout=0.0)))
    for n, p in model.named_parameters():  # non-zero B, so the adapters change the output
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    return model


def _run(model, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    (out.float().square() * mask[..., None]).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.detach(), grads


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    return ids, mask


class _Counted:
    def __init__(self, fn, calls: list[str]) -> None:
        self.fn, self.calls = fn, calls

    def apply(self, *args):
        self.calls.append(self.fn.__name__)
        return self.fn.apply(*args)


@pytest.mark.parametrize("grouped", [False, True])
def test_tiny_qwen2_outputs_and_lora_gradients_equal_hf(grouped: bool, monkeypatch) -> None:
    ids, mask = _batch()
    theirs = _peft()
    ours = copy.deepcopy(theirs)
    if grouped:
        group_lora_layers(ours)
    fused, counts = fuse_decoder_layers(ours)
    layers = len(ours.get_base_model().model.layers)
    assert counts == {"norm": 2 * layers + 1, "mlp": layers, "attn": layers}
    calls = []  # the fused functions really ran
    for fn in (RmsNorm, SiluMul, Attention):
        monkeypatch.setattr(cpu_layers, fn.__name__, _Counted(fn, calls))
    out_t, grads_t = _run(theirs, ids, mask)
    out_o, grads_o = _run(ours, ids, mask)
    assert sorted(set(calls)) == ["Attention", "RmsNorm", "SiluMul"]
    assert len(calls) == sum(counts.values())
    valid = mask.bool()
    torch.testing.assert_close(out_o[valid], out_t[valid], rtol=1e-4, atol=1e-5)
    assert grads_o.keys() == grads_t.keys()
    for n, g in grads_t.items():
        torch.testing.assert_close(grads_o[n], g, rtol=1e-3, atol=1e-6, msg=n)
    fused.enabled = False  # HF's forwards again: exactly HF's numbers
    out_off, grads_off = _run(ours, ids, mask)
    if not grouped:
        assert torch.equal(out_off, out_t)
        assert all(torch.equal(grads_off[n], g) for n, g in grads_t.items())


def test_bf16_under_autocast_is_close_to_hf() -> None:
    ids, mask = _batch()
    theirs = _peft(torch.bfloat16)
    for p in theirs.parameters():  # fp32 adapters under bf16 autocast, as `sft` trains
        if p.requires_grad:
            p.data = p.data.float()
    ours = copy.deepcopy(theirs)
    group_lora_layers(ours, pack=True)
    fuse_decoder_layers(ours)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_t, grads_t = _run(theirs, ids, mask)
        out_o, grads_o = _run(ours, ids, mask)
    valid = mask.bool()
    assert F.cosine_similarity(out_o[valid].float().flatten(), out_t[valid].float().flatten(),
                               dim=0) > 0.999  # fmt: skip
    for n, g in grads_t.items():
        assert F.cosine_similarity(grads_o[n].flatten(), g.flatten(), dim=0) > 0.99, n


def test_generation_with_a_cache_goes_through_hf() -> None:
    """A KV cache is not modelled: generate gives HF's tokens."""
    theirs = _peft().eval()
    ours = copy.deepcopy(theirs)
    fuse_decoder_layers(ours)
    ids = torch.randint(3, 200, (1, 6), generator=torch.Generator().manual_seed(2))
    kw = {"max_new_tokens": 5, "do_sample": False}
    with torch.no_grad():
        assert torch.equal(ours.generate(input_ids=ids, **kw), theirs.generate(input_ids=ids, **kw))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_head_matches_linear(dtype: torch.dtype) -> None:
    if not available(dtype):
        pytest.skip(f"oneDNN has no {dtype} on this CPU")
    head = torch.nn.Linear(32, 300, bias=False).to(dtype).requires_grad_(False)
    ref = copy.deepcopy(head)
    switch = pack_head(head)
    assert switch is not None
    x = torch.randn(5, 32, dtype=dtype)
    ours, theirs = _grads(head, x), _grads(ref, x)
    tol = {"rtol": 1e-5, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    _close(ours, theirs, **tol)
    switch.enabled = False
    _close(_grads(head, x), theirs, rtol=0, atol=0)
    trainable = torch.nn.Linear(32, 300, bias=False)
    assert pack_head(trainable) is None  # a trained head keeps nn.Linear's gradient
