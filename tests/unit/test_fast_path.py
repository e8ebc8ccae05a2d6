"""The fast GPU path's pieces against plain PyTorch / peft, on the CPU (CI has no GPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen2Config, Qwen2ForCausalLM

from tunesmith.model.fast import FastOptions, apply_fast_path
from tunesmith.model.fast.lora_fused import lora_linear, patch_lora_layers
from tunesmith.model.fast.loss import linear_cross_entropy
from tunesmith.model.lora import CausalLMLoss, lora_config
from tunesmith.options import LoraOptions
from tunesmith.utils import UserError


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("bias", [True, False])
def test_lora_linear_matches_autograd_reference(bias: bool) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 16, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(12, 16, generator=g, dtype=torch.float64)
    b = torch.randn(12, generator=g, dtype=torch.float64) if bias else None
    a = torch.randn(4, 16, generator=g, dtype=torch.float64, requires_grad=True)
    bb = torch.randn(12, 4, generator=g, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(2, 5, 12, generator=g, dtype=torch.float64)

    ref = x @ w.t() + (0 if b is None else b) + 2.5 * (x @ a.t()) @ bb.t()
    ref_grads = torch.autograd.grad(ref, (x, a, bb), dy)
    out = lora_linear(x, w, b, a, bb, 2.5)
    grads = torch.autograd.grad(out, (x, a, bb), dy)
    assert _rel(out, ref) < 1e-12
    for got, want in zip(grads, ref_grads, strict=True):
        assert got.shape == want.shape and _rel(got, want) < 1e-12


def test_lora_linear_bf16_activations_fp32_adapter() -> None:
    """bf16 activations with fp32 master adapter weights: bf16 math, fp32 gradients back."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(64, 32, generator=g).bfloat16().requires_grad_()
    w = torch.randn(48, 32, generator=g).bfloat16()
    a = torch.randn(8, 32, generator=g, requires_grad=True)
    bb = torch.randn(48, 8, generator=g, requires_grad=True)
    out = lora_linear(x, w, None, a, bb, 4.0)
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    assert a.grad is not None and a.grad.dtype == torch.float32
    x64, a64, b64 = (t.detach().double().requires_grad_() for t in (x, a, bb))
    ref = x64 @ w.double().t() + 4.0 * (x64 @ a64.t()) @ b64.t()
    ref.square().sum().backward()
    assert _rel(out, ref) < 1e-2
    assert _rel(a.grad, a64.grad) < 2e-2 and _rel(bb.grad, b64.grad) < 2e-2
    assert _rel(x.grad, x64.grad) < 2e-2


def test_linear_cross_entropy_matches_torch() -> None:
    g = torch.Generator().manual_seed(3)
    h = torch.randn(37, 16, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, generator=g, dtype=torch.float64)
    t = torch.randint(0, 50, (37,), generator=g)
    logits = h @ w.t()
    ref = F.cross_entropy(logits, t, reduction="sum")
    (ref_grad,) = torch.autograd.grad(ref * 0.7, h)
    # Several chunks, a ragged last one; the logits are reduced in fp32 (as the GPU path does).
    loss, correct = linear_cross_entropy(h, w, t, chunk=8)
    (grad,) = torch.autograd.grad(loss * 0.7, h)
    assert abs(loss.item() - ref.item()) < 1e-6 * abs(ref.item())
    assert int(correct) == int((logits.argmax(-1) == t).sum())
    assert _rel(grad, ref_grad) < 1e-6
    with torch.no_grad():  # evaluation: no gradient is formed
        assert float(linear_cross_entropy(h, w, t, chunk=8)[0]) == float(loss)


def test_linear_cross_entropy_refuses_a_trained_head() -> None:
    with pytest.raises(ValueError, match="frozen"):
        linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4, requires_grad=True),
                             torch.zeros(3, dtype=torch.long))  # fmt: skip


def _tiny_peft(seed: int = 0, dropout: float = 0.0):
    from peft import get_peft_model

    cfg = Qwen2Config(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg)
    peft_cfg = lora_config(LoraOptions(rank=4, alpha=16, dropout=dropout))
    model = get_peft_model(model, peft_cfg)
    for name, p in model.named_parameters():  # B starts at zero: make the adapter matter
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return model


def _loss_and_grads(model, fused_ce: bool):
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 300, (2, 24), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100  # prompt positions carry no loss
    loss, n, correct = CausalLMLoss(model, fused_ce=fused_ce)(input_ids=ids, labels=labels)
    (loss / n).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    return loss.item(), int(correct), grads


@pytest.mark.parametrize(("ckpt", "group"), [(False, False), (True, False), (False, True),
                                             (True, True)])  # fmt: skip
def test_fast_path_matches_peft_on_a_tiny_qwen2(ckpt: bool, group: bool) -> None:
    """Same loss, correct count and LoRA gradients as peft's own forward (fp32, CPU)."""
    ref = _loss_and_grads(_tiny_peft(), fused_ce=False)
    model = _tiny_peft()
    if ckpt:  # as sft() sets it up on a GPU: each layer recomputed in backward
        kwargs = {"use_reentrant": False}
        model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.train()
    done = apply_fast_path(model, FastOptions(group=group))
    assert done[0] == "fused LoRA on 14/14 layers"  # 7 projections x 2 layers
    if group:  # QKV and gate/up of each of the 2 layers
        assert done[1] == "grouped LoRA: 4 QKV and gate/up groups"
    got = _loss_and_grads(model, fused_ce=True)
    assert abs(got[0] - ref[0]) < 1e-5 * abs(ref[0])
    assert got[1] == ref[1]
    assert got[2].keys() == ref[2].keys() and len(got[2]) == 28
    for k, want in ref[2].items():
        assert _rel(got[2][k], want) < 1e-5, k


def test_dropout_layers_are_fused_and_dropout_is_off_in_eval() -> None:
    model = _tiny_peft(dropout=0.1)
    assert patch_lora_layers(model) == (14, 14)
    ids = torch.randint(0, 300, (1, 12))
    model.eval()  # no dropout: the fused layers give peft's output
    fused = model(input_ids=ids).logits
    ref = _tiny_peft(dropout=0.1).eval()(input_ids=ids).logits
    assert _rel(fused, ref) < 1e-5
    model.train()  # dropout on: outputs differ between calls
    assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)


def test_fast_options_parse() -> None:
    assert FastOptions.parse("all") == FastOptions() == FastOptions.parse("auto")
    assert FastOptions.parse("none") == FastOptions(
        lora=False, group=False, kernels=False, loss=False, graphs=False, embed=False
    )
    assert FastOptions.parse("lora, loss") == FastOptions(
        lora=True, group=False, kernels=False, loss=True, graphs=False, embed=False
    )
    with pytest.raises(UserError, match="unknown part 'fused'"):
        FastOptions.parse("lora,fused")


def _group_case(dtype: torch.dtype, seed: int = 6):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 5, 16, generator=g).to(dtype).requires_grad_()
    outs, scalings = (12, 4, 4), (2.5, 2.5, 0.5)
    frozen = tuple(
        (torch.randn(o, 16, generator=g).to(dtype), torch.randn(o, generator=g).to(dtype))
        if i != 1 else (torch.randn(o, 16, generator=g).to(dtype), None)
        for i, o in enumerate(outs)
    )  # fmt: skip
    adapters = []
    for o, r in zip(outs, (4, 2, 4), strict=True):  # ranks may differ (peft's rank_pattern)
        a = torch.randn(r, 16, generator=g, dtype=torch.float64)
        b = torch.randn(o, r, generator=g, dtype=torch.float64)
        adapters += [a.requires_grad_(), b.requires_grad_()]
    dys = [torch.randn(2, 5, o, generator=g, dtype=torch.float64) for o in outs]
    return x, frozen, scalings, adapters, dys


def _group_reference(x, frozen, scalings, adapters, dys, used):
    x64 = x.detach().double().requires_grad_()
    ad64 = [a.detach().double().requires_grad_() for a in adapters]
    total = 0
    for i, ((w, b), s) in enumerate(zip(frozen, scalings, strict=True)):
        y = x64 @ w.double().t() + (0 if b is None else b.double())
        y = y + s * (x64 @ ad64[2 * i].t()) @ ad64[2 * i + 1].t()
        if i in used:
            total = total + (y * dys[i]).sum()
    return torch.autograd.grad(total, (x64, *ad64), allow_unused=True)


@pytest.mark.parametrize("used", [(0, 1, 2), (0, 2)])
def test_lora_group_matches_per_projection_reference(used: tuple[int, ...]) -> None:
    """Outputs and gradients of x and every A, B (float64); an unused output adds nothing."""
    from tunesmith.model.fast.lora_group import LoraGroupFunction

    x, frozen, scalings, adapters, dys = _group_case(torch.float64)
    outs = LoraGroupFunction.apply(x, frozen, scalings, None, *adapters)
    for i, ((w, b), s) in enumerate(zip(frozen, scalings, strict=True)):
        ref = (
            x @ w.t()
            + (0 if b is None else b)
            + s * (x @ adapters[2 * i].t()) @ adapters[2 * i + 1].t()
        )
        assert _rel(outs[i], ref) < 1e-12
    total = sum((outs[i] * dys[i]).sum() for i in used)
    got = torch.autograd.grad(total, (x, *adapters), allow_unused=True)
    want = _group_reference(x, frozen, scalings, adapters, dys, used)
    for k, (a, b) in enumerate(zip(got, want, strict=True)):
        if k > 0 and (k - 1) // 2 not in used:  # an unused member's A and B: no gradient
            assert b is None and (a is None or float(a.abs().max()) == 0.0)
            continue
        assert a is not None and _rel(a, b) < 1e-12, k


def test_lora_group_bf16_activations_fp32_adapter() -> None:
    from tunesmith.model.fast.lora_group import LoraGroupFunction

    x, frozen, scalings, adapters, dys = _group_case(torch.bfloat16)
    adapters = [a.detach().float().requires_grad_() for a in adapters]
    outs = LoraGroupFunction.apply(x, frozen, scalings, None, *adapters)
    assert all(o.dtype == torch.bfloat16 for o in outs)
    total = sum((o.double() * dy).sum() for o, dy in zip(outs, dys, strict=True))
    got = torch.autograd.grad(total, (x, *adapters))
    assert all(g.dtype == torch.float32 for g in got[1:])
    want = _group_reference(x, frozen, scalings, adapters, dys, (0, 1, 2))
    for a, b in zip(got, want, strict=True):
        assert _rel(a, b) < 2e-2


def test_grouped_layers_serve_siblings_from_one_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """One group call per block for QKV and one for gate/up; peft's output unchanged."""
    from tunesmith.model.fast import lora_group

    calls = []
    real = lora_group.LoraGroupFunction.apply
    monkeypatch.setattr(lora_group.LoraGroupFunction, "apply",
                        lambda *a: calls.append(1) or real(*a))  # fmt: skip
    ids = torch.randint(0, 300, (1, 12))
    ref = _tiny_peft().eval()(input_ids=ids).logits
    model = _tiny_peft().eval()
    apply_fast_path(model, FastOptions(kernels=False))
    assert _rel(model(input_ids=ids).logits, ref) < 1e-5
    assert len(calls) == 4  # 2 layers x (QKV, gate/up)
    with model.disable_adapter():  # adapters off: the base alone, through peft's forward
        base = model(input_ids=ids).logits
    assert len(calls) == 4 and _rel(base, ref) > 1e-4


def test_grouped_layers_with_dropout_stay_grouped(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dropout on: the group draws one mask for its input (test_fast_dropout.py checks the
    math), so training stays grouped; eval (no dropout) too."""
    from tunesmith.model.fast import lora_group

    calls = []
    real = lora_group.LoraGroupFunction.apply
    monkeypatch.setattr(lora_group.LoraGroupFunction, "apply",
                        lambda *a: calls.append(1) or real(*a))  # fmt: skip
    model = _tiny_peft(dropout=0.1)
    apply_fast_path(model, FastOptions(kernels=False))
    ids = torch.randint(0, 300, (1, 12))
    model.train()
    model(input_ids=ids).logits.sum().backward()
    assert len(calls) == 4  # 2 layers x (QKV, gate/up)
    model.eval()
    ref = _tiny_peft(dropout=0.1).eval()(input_ids=ids).logits
    assert _rel(model(input_ids=ids).logits, ref) < 1e-5 and len(calls) == 8


@pytest.mark.parametrize("group", [False, True])
def test_fast_path_trains_with_a_fused_optimizer(group: bool) -> None:
    """Fused AdamW updates the adapter without moving its version counter: the cached
    compute-dtype copies must still follow every step (found on the H200, issue 17)."""
    runs = []
    for fast in (False, True):
        model = _tiny_peft()
        if fast:
            apply_fast_path(model, FastOptions(group=group))
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-2, fused=True)
        losses = []
        for _ in range(3):
            loss, _, _ = _loss_and_grads(model, fused_ce=fast)
            losses.append(loss)
            opt.step()
            opt.zero_grad(set_to_none=True)
        runs.append(losses)
    assert runs[0][0] != runs[0][2]  # the reference does train
    for got, want in zip(runs[1], runs[0], strict=True):
        assert abs(got - want) < 1e-4 * abs(want)
