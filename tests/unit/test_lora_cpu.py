"""The grouped CPU LoRA function: peft's outputs and gradients, the shared dropout's masks."""

from __future__ import annotations

import copy

import pytest
import torch

from tiny import build_tiny_model, build_tiny_tokenizer
from tunesmith.model.lora import lora_config
from tunesmith.model.lora_cpu import group_lora_layers
from tunesmith.model.lora_dropout import share_lora_dropout
from tunesmith.options import LoraOptions


def _peft(dropout: float, dtype: torch.dtype = torch.float32):
    from peft import get_peft_model

    torch.manual_seed(0)
    base = build_tiny_model(build_tiny_tokenizer(), seed=0).to(dtype)
    model = get_peft_model(base, lora_config(LoraOptions(rank=4, alpha=8, dropout=dropout)))
    for n, p in model.named_parameters():  # non-zero B, so the adapters change the output
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    return model


def _run(model, ids: torch.Tensor, seed: int = 3) -> tuple[torch.Tensor, dict]:
    torch.manual_seed(seed)
    out = model(input_ids=ids).logits
    out.float().square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.detach(), grads


def test_groups_q_k_v_and_gate_up() -> None:
    model = _peft(0.0)
    routed, grouped = group_lora_layers(model)
    layers = len(model.get_base_model().model.layers)
    assert routed == 7 * layers
    assert grouped == 2 * layers  # q/k/v and gate/up in every decoder layer


@pytest.mark.parametrize("train", [True, False])
def test_no_dropout_equals_peft_outputs_and_gradients(train: bool) -> None:
    """p = 0 (and eval mode): the same function of x, A, B, W as peft, rounding aside."""
    ids = torch.randint(3, 200, (2, 16))
    theirs = _peft(0.0)
    ours = copy.deepcopy(theirs)
    group_lora_layers(ours)
    for m in (theirs, ours):
        m.train(train)
    out_t, grads_t = _run(theirs, ids)
    out_o, grads_o = _run(ours, ids)
    torch.testing.assert_close(out_o, out_t, rtol=1e-5, atol=1e-5)
    assert grads_o.keys() == grads_t.keys()
    for n, g in grads_t.items():
        torch.testing.assert_close(grads_o[n], g, rtol=1e-4, atol=1e-7, msg=n)


def test_dropout_draws_the_shared_dropouts_masks() -> None:
    """p > 0: the same masks, outputs and gradients as the shared-input dropout under peft."""
    ids = torch.randint(3, 200, (1, 24))
    theirs = _peft(0.2)
    share_lora_dropout(theirs)
    ours = copy.deepcopy(theirs)
    routed, _ = group_lora_layers(ours)
    assert routed > 0
    for m in (theirs, ours):
        m.train()
    out_t, grads_t = _run(theirs, ids)
    out_o, grads_o = _run(ours, ids)
    torch.testing.assert_close(out_o, out_t, rtol=1e-5, atol=1e-5)
    for n, g in grads_t.items():
        torch.testing.assert_close(grads_o[n], g, rtol=1e-4, atol=1e-7, msg=n)
    # A new draw with another seed gives another result: the mask is really applied.
    out_2, _ = _run(ours, ids, seed=4)
    assert not torch.equal(out_2, out_o)


def test_bf16_under_autocast_is_close_to_peft() -> None:
    """The CPU training setting: bf16 base, fp32 adapters, autocast; fp32 gradients back."""
    ids = torch.randint(3, 200, (1, 24))
    theirs = _peft(0.0, torch.bfloat16)
    for p in theirs.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    ours = copy.deepcopy(theirs)
    group_lora_layers(ours)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_t, grads_t = _run(theirs, ids)
        out_o, grads_o = _run(ours, ids)
    assert out_o.dtype == out_t.dtype
    torch.testing.assert_close(out_o.float(), out_t.float(), rtol=0.05, atol=0.05)
    for n, g in grads_t.items():
        assert grads_o[n].dtype == torch.float32
        cos = torch.nn.functional.cosine_similarity(grads_o[n].flatten(), g.flatten(), dim=0)
        assert cos > 0.99, n


def test_a_member_called_with_another_input_computes_alone() -> None:
    """The grouping only decides speed: k_proj on another tensor than q_proj's is right."""
    model = _peft(0.0)
    ref = copy.deepcopy(model)
    group_lora_layers(model)
    attn, attn_ref = (m.get_base_model().model.layers[0].self_attn for m in (model, ref))
    x, y = torch.randn(1, 5, attn.q_proj.in_features), torch.randn(1, 5, attn.k_proj.in_features)
    with torch.no_grad():
        q = attn.q_proj(x)  # computes q, k, v for x and keeps k, v
        k = attn.k_proj(y)  # another input: not the cached k
        torch.testing.assert_close(q, attn_ref.q_proj(x))
        torch.testing.assert_close(k, attn_ref.k_proj(y))
        torch.testing.assert_close(attn.v_proj(x), attn_ref.v_proj(x))  # still cached for x


def test_a_trainable_base_weight_gets_peft_gradients() -> None:
    """A base weight someone unfroze goes through peft's forward: the grouped function has
    no gradient for it, and silently dropping it would train something else."""
    ids = torch.randint(3, 200, (1, 12))
    theirs = _peft(0.0)
    theirs.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight.requires_grad_()
    ours = copy.deepcopy(theirs)
    group_lora_layers(ours, pack=True)
    _out_t, grads_t = _run(theirs, ids)
    _out_o, grads_o = _run(ours, ids)
    name = next(n for n in grads_t if "q_proj.base_layer.weight" in n)
    torch.testing.assert_close(grads_o[name], grads_t[name], rtol=1e-4, atol=1e-7)


def test_disabled_adapter_goes_through_peft() -> None:
    model = _peft(0.0)
    group_lora_layers(model)
    ids = torch.randint(3, 200, (1, 8))
    with torch.no_grad(), model.disable_adapter():
        off = model(input_ids=ids).logits
    with torch.no_grad():
        on = model(input_ids=ids).logits
        base = model.get_base_model()
    assert not torch.equal(off, on)
    assert base is not None


def test_malloc_env_preloads_an_installed_allocator_once(tmp_path, monkeypatch) -> None:
    from tunesmith import utils

    lib = tmp_path / "libtcmalloc_minimal.so.4"
    monkeypatch.setattr(utils, "MALLOC_LIBS", (str(tmp_path / "missing.so"), str(lib)))
    assert utils.malloc_env({}) is None  # nothing installed
    lib.write_bytes(b"")
    env = utils.malloc_env({"LD_PRELOAD": "/x/other.so", "A": "1"})
    assert env == {"LD_PRELOAD": f"{lib}:/x/other.so", "A": "1"}
    assert utils.malloc_env(env) is None  # already preloaded: no second re-exec
    assert utils.malloc_env({"TUNESMITH_MALLOC": "system"}) is None


def test_cpu_fast_parts() -> None:
    from tunesmith.model.cpu_fast import CpuFast
    from tunesmith.utils import UserError

    auto = CpuFast(lora=True, attn=True, adamw=True, pack=True, head=True)
    assert CpuFast.parse("auto") == auto
    assert CpuFast.parse("auto", cpu=False) == CpuFast()
    assert CpuFast.parse("none") == CpuFast()
    assert CpuFast.parse("all").compile
    assert CpuFast.parse("lora, adamw") == CpuFast(lora=True, adamw=True)
    with pytest.raises(UserError, match="unknown part 'flash'"):
        CpuFast.parse("lora,flash")


def test_prepacking_is_skipped_when_memory_is_short(monkeypatch) -> None:
    from tunesmith.model import cpu_fast

    options = cpu_fast.CpuFast(lora=True, pack=True)
    monkeypatch.setattr(cpu_fast, "available_memory", lambda: 1000)
    done = cpu_fast.apply_cpu_fast(_peft(0.0), options, "eager")
    assert any(d.startswith("no prepacked weights") for d in done)
    assert not any("prepacked for oneDNN" in d for d in done)
    monkeypatch.setattr(cpu_fast, "available_memory", lambda: 2**40)
    done = cpu_fast.apply_cpu_fast(_peft(0.0), options, "eager")
    assert any("prepacked for oneDNN" in d for d in done)
