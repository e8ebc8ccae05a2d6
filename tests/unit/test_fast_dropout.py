"""The fast path's graph-safe LoRA dropout (``model/fast/dropout.py``) on the CPU: the mask's
statistics, the fused functions against plain PyTorch with the same mask, recompute and CUDA
graphs (emulated) reproducing the forward's masks, and the Triton kernel through Triton's
interpreter where Triton is installed."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tunesmith.model.fast import FastOptions, apply_fast_path
from tunesmith.model.fast.dropout import SEED_ATTR, Drop, add_drop_, apply_drop, keep_mask
from tunesmith.model.fast.lora_fused import lora_linear
from tunesmith.model.fast.lora_group import LoraGroupFunction
from tunesmith.model.lora import CausalLMLoss, lora_config
from tunesmith.options import LoraOptions

ROOT = Path(__file__).resolve().parents[2]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def _seed(value: int) -> torch.Tensor:
    return torch.tensor([value], dtype=torch.int64)


def test_mask_is_a_fair_coin_per_element_and_changes_with_seed_and_salt() -> None:
    shape = torch.Size((512, 1024))
    keep = keep_mask(Drop(_seed(11), 3, 0.05), shape, torch.device("cpu"))
    assert keep.shape == shape and keep.dtype == torch.bool
    assert abs(float(keep.float().mean()) - 0.95) < 0.002  # 524,288 draws: sd 0.0003
    # rows and columns alike (no stripes from the counter layout)
    assert float(keep.float().mean(0).std()) < 0.03 and float(keep.float().mean(1).std()) < 0.03
    same = keep_mask(Drop(_seed(11), 3, 0.05), shape, torch.device("cpu"))
    assert torch.equal(keep, same)  # a pure function of (seed, salt, index)
    for other in (Drop(_seed(12), 3, 0.05), Drop(_seed(11), 4, 0.05)):
        k2 = keep_mask(other, shape, torch.device("cpu"))
        both = float((keep & k2).float().mean())
        assert abs(both - 0.95**2) < 0.002  # independent draws, not shifted copies


def test_inverted_scaling_keeps_the_expectation() -> None:
    x = torch.ones(1 << 20, dtype=torch.float64)
    y = apply_drop(x, Drop(_seed(5), 0, 0.3))
    assert set(torch.unique(y).tolist()) == {0.0, 1 / 0.7}
    assert abs(float(y.mean()) - 1.0) < 0.004
    acc = torch.full_like(x, 2.0)
    add_drop_(acc, x, Drop(_seed(5), 0, 0.3))
    assert torch.equal(acc, y + 2.0)


def _lora_data(seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 16, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(10, 16, generator=g, dtype=torch.float64)
    a = torch.randn(4, 16, generator=g, dtype=torch.float64, requires_grad=True)
    bb = torch.randn(10, 4, generator=g, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(6, 10, generator=g, dtype=torch.float64)
    return x, w, a, bb, dy


def test_lora_linear_dropout_matches_plain_torch_with_the_same_mask() -> None:
    """peft's math with the hashed mask: y = xW^T + s (drop(x) A^T) B^T, drop(x) = x*keep/(1-p)."""
    x, w, a, bb, dy = _lora_data()
    drop = Drop(_seed(99), 17, 0.3)
    keep = keep_mask(drop, x.shape, x.device)
    ref = x @ w.t() + 2.0 * ((x * keep / 0.7) @ a.t()) @ bb.t()
    ref_grads = torch.autograd.grad(ref, (x, a, bb), dy)
    out = lora_linear(x, w, None, a, bb, 2.0, drop=drop)
    grads = torch.autograd.grad(out, (x, a, bb), dy)
    assert _rel(out, ref) < 1e-12
    for got, want in zip(grads, ref_grads, strict=True):
        assert _rel(got, want) < 1e-12


def test_grouped_function_with_dropout_matches_plain_torch() -> None:
    """QKV-like group: one mask for the shared input, every member's output and gradient."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 5, 16, generator=g, dtype=torch.float64, requires_grad=True)
    outs_n = (12, 6, 6)
    ws = [torch.randn(o, 16, generator=g, dtype=torch.float64) for o in outs_n]
    bs = [torch.randn(o, generator=g, dtype=torch.float64) for o in outs_n]
    adapters = []
    for o in outs_n:
        for shape in ((4, 16), (o, 4)):
            adapters.append(torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_())
    scalings = (2.0, 0.5, 1.5)
    dys = [torch.randn(2, 5, o, generator=g, dtype=torch.float64) for o in outs_n]
    drop = Drop(_seed(3), 40, 0.1)
    xd = x * keep_mask(drop, torch.Size((10, 16)), x.device).view(2, 5, 16) / 0.9
    parts = zip(ws, bs, scalings, adapters[::2], adapters[1::2], strict=True)
    ref = [x @ w.t() + b + s * (xd @ a.t()) @ bb.t() for w, b, s, a, bb in parts]
    frozen = tuple(zip(ws, bs, strict=True))
    got = LoraGroupFunction.apply(x, frozen, scalings, drop, *adapters)
    for o, r in zip(got, ref, strict=True):
        assert _rel(o, r) < 1e-12
    want = torch.autograd.grad(ref, (x, *adapters), dys)
    have = torch.autograd.grad(got, (x, *adapters), dys)
    for h, wnt in zip(have, want, strict=True):
        assert _rel(h, wnt) < 1e-12


def _tiny(dropout: float, ckpt: bool, layers: int = 2):
    from peft import get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      tie_word_embeddings=False)  # fmt: skip
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg)
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, lora_config(LoraOptions(rank=4, alpha=16, dropout=dropout)))
    for name, p in model.named_parameters():  # B starts at zero: make the adapter matter
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    model.train()
    return model


def _loss_grads(model, seed: int | None = None):
    if seed is not None:  # the step seed the next forward will draw: fixed through the RNG
        torch.manual_seed(seed)
    ids = torch.randint(0, 300, (1, 20), generator=torch.Generator().manual_seed(4))
    loss, n, _ = CausalLMLoss(model, fused_ce=True)(input_ids=ids, labels=ids)
    (loss / n).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


@pytest.mark.parametrize("group", [False, True])
def test_recompute_draws_the_forward_masks(group: bool) -> None:
    """With gradient checkpointing the layers are recomputed in backward: the hashed masks
    give the same loss and LoRA gradients as the run that keeps its activations."""
    runs = []
    for ckpt in (False, True):
        model = _tiny(0.2, ckpt)
        apply_fast_path(model, FastOptions(kernels=False, group=group, graphs=False))
        runs.append(_loss_grads(model, seed=123))
    (loss0, g0), (loss1, g1) = runs
    assert abs(loss0 - loss1) < 1e-6 * abs(loss0) and len(g0) == 28
    for k, want in g0.items():
        assert _rel(g1[k], want) < 1e-6, k


def test_masks_change_every_training_forward_and_not_in_eval() -> None:
    model = _tiny(0.2, ckpt=False)
    apply_fast_path(model, FastOptions(kernels=False, graphs=False))
    decoder = model.get_base_model().model
    seed = getattr(decoder, SEED_ATTR)
    ids = torch.randint(0, 300, (1, 12))
    before = seed.clone()
    first = model(input_ids=ids).logits
    mid = seed.clone()
    second = model(input_ids=ids).logits
    assert not torch.equal(before, mid) and not torch.equal(mid, seed)
    assert not torch.equal(first, second)  # new masks
    model.eval()
    after = seed.clone()
    with torch.no_grad():
        model(input_ids=ids)
    assert torch.equal(after, seed)  # eval draws no seed (and applies no dropout)
    assert SEED_ATTR not in model.state_dict()  # not a checkpointed tensor


def test_grouped_dropout_equals_the_members_run_alone_with_one_salt() -> None:
    """The group's one mask is its first member's: the ungrouped layers given the same salt
    per group compute the same loss and gradients."""
    grouped = _tiny(0.2, ckpt=False)
    apply_fast_path(grouped, FastOptions(kernels=False, graphs=False))
    alone = _tiny(0.2, ckpt=False)
    apply_fast_path(alone, FastOptions(kernels=False, group=False, graphs=False))
    for layer in alone.get_base_model().model.layers:
        for parent, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj")),
                              (layer.mlp, ("gate_proj", "up_proj"))):  # fmt: skip
            first = getattr(parent, names[0])._ts_seed
            for n in names[1:]:
                getattr(parent, n)._ts_seed = first
    (l0, g0), (l1, g1) = _loss_grads(grouped, seed=9), _loss_grads(alone, seed=9)
    assert abs(l0 - l1) < 1e-6 * abs(l0)
    for k, want in g1.items():
        assert _rel(g0[k], want) < 1e-5, k


@pytest.mark.skipif(sys.platform == "win32", reason="subprocess with Triton's interpreter")
def test_triton_kernel_draws_the_reference_mask() -> None:
    """The Triton kernel under ``TRITON_INTERPRET=1``: the same mask bit for bit as the
    PyTorch reference (fp32 values equal; bf16 within one unit of rounding)."""
    pytest.importorskip("triton")
    code = textwrap.dedent("""
        import torch
        from tunesmith.model.fast import dropout as D
        seed = torch.tensor([123456789], dtype=torch.int64)
        for p, salt, n, dt in [(0.05, 0, 5000, torch.float32), (0.3, 7, 4099, torch.bfloat16),
                               (0.5, 1, 3000, torch.float32), (0.05, 1 << 20, 6149, torch.float32)]:
            d = D.Drop(seed, salt, p)
            x, acc = torch.randn(n, dtype=dt), torch.randn(n, dtype=dt)
            got, want = D._launch(x, d, None), D.drop_reference(x, d)
            assert torch.equal(got == 0, want == 0), (p, salt)
            got2, want2 = D._launch(x, d, acc.clone()), D.drop_reference(x, d, acc)
            tol = 0 if dt == torch.float32 else 1e-2
            assert torch.allclose(got, want, rtol=tol, atol=0), (p, salt)
            assert torch.allclose(got2, want2, rtol=tol, atol=tol), (p, salt)
        print("ok")
    """)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT / "src"))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=300)  # fmt: skip
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_sft_shared_dropout_is_served_by_the_fused_layers() -> None:
    """``sft`` shares the LoRA dropout per input first (``share_lora_dropout``): the fused
    layers still take every layer, with the shared dropout's probability."""
    from tunesmith.model.lora_dropout import share_lora_dropout

    model = _tiny(0.05, ckpt=False)
    assert share_lora_dropout(model) == 14
    done = apply_fast_path(model, FastOptions(kernels=False, graphs=False))
    assert done[0] == "fused LoRA on 14/14 layers"
    q = model.get_base_model().model.layers[0].self_attn.q_proj
    assert q._ts_seed.drop(0.05, torch.device("cpu")).p == 0.05
    loss, grads = _loss_grads(model, seed=1)
    assert torch.isfinite(torch.tensor(loss)) and len(grads) == 28
