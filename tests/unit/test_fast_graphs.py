"""``--fast graphs`` and ``--fast embed`` on the CPU: the graph plumbing through a stand-in for
CUDA graphs (``graphs.EMULATE``: replay re-runs the captured function into the static
tensors), against the eager fast path; the host embedding against the plain one."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from tunesmith.model.fast import FastOptions, apply_fast_path, graphs
from tunesmith.model.fast.embed import host_embedding
from tunesmith.model.lora import CausalLMLoss, lora_config
from tunesmith.model.lora_dropout import share_lora_dropout
from tunesmith.options import LoraOptions


def _model(ckpt: bool, layers: int = 3, dropout: float = 0.0):
    from peft import get_peft_model

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


def _steps(model, n: int, seqs: list[int]) -> list[tuple[float, dict]]:
    """``n`` SGD steps, batch i of length ``seqs[i % len(seqs)]``; (loss, grads) per step."""
    module = CausalLMLoss(model, fused_ce=True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.5)
    g = torch.Generator().manual_seed(7)
    out = []
    for i in range(n):
        ids = torch.randint(0, 300, (1, seqs[i % len(seqs)]), generator=g)
        loss, count, _ = module(input_ids=ids, labels=ids)
        (loss / count).backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
        out.append((loss.item(), grads))
        opt.step()
        opt.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("ckpt", [True, False])
def test_graphed_layers_match_the_eager_fast_path(ckpt: bool, monkeypatch) -> None:
    """Warm-up steps eager, then capture, then replays: every step's loss and LoRA gradients
    equal the eager fast path's, also after the optimizer has changed the weights."""
    monkeypatch.setattr(graphs, "EMULATE", True)
    ref = _steps(_apply(_model(ckpt), graphs_on=False), 6, [16])
    model = _apply(_model(ckpt), graphs_on=True)
    got = _steps(model, 6, [16])
    gs = model.get_base_model().model.layers[0]._ts_graphs
    assert sorted(gs.layers) == [0, 1, 2] and gs.shape == (1, 16, 64)
    # Layer i reads layer i-1's static output in place; the first has a buffer of its own.
    assert gs.layers[1].x.data_ptr() == gs.layers[0].out.data_ptr()
    assert gs.layers[0].x.data_ptr() != gs.layers[0].out.data_ptr()
    # Without recompute the backward graph reads the forward's saved activations: kept alive.
    assert (gs.layers[0].held is None) == ckpt
    for (loss, grads), (want_loss, want) in zip(got, ref, strict=True):
        assert abs(loss - want_loss) < 1e-5 * abs(want_loss)
        assert grads.keys() == want.keys() and len(grads) == 42  # 7 projections x 2 x 3 layers
        for k, w in want.items():
            assert torch.allclose(grads[k], w, rtol=1e-4, atol=1e-6), k


def test_other_shapes_and_eval_run_eagerly(monkeypatch) -> None:
    """Only the first shape seen through the warm-up is graphed; other lengths, and eval mode,
    take the eager path with the same results."""
    monkeypatch.setattr(graphs, "EMULATE", True)
    ref = _steps(_apply(_model(True), graphs_on=False), 8, [16, 16, 16, 16, 9])
    model = _apply(_model(True), graphs_on=True)
    got = _steps(model, 8, [16, 16, 16, 16, 9])
    gs = model.get_base_model().model.layers[0]._ts_graphs
    assert gs.shape == (1, 16, 64) and len(gs.layers) == 3
    for (loss, _), (want, _) in zip(got, ref, strict=True):
        assert abs(loss - want) < 1e-5 * abs(want)
    model.eval()
    with torch.no_grad():
        ids = torch.randint(0, 300, (1, 16))
        assert CausalLMLoss(model, fused_ce=True)(input_ids=ids, labels=ids)[0].isfinite()


@pytest.mark.parametrize("ckpt", [True, False])
def test_graphs_replay_lora_dropout_with_the_eager_masks(ckpt: bool, monkeypatch) -> None:
    """LoRA dropout on (the fused layers' hashed masks): the layers are graphed, and every
    step's loss and gradients equal the eager fast path's with the same step seeds; the masks
    change between steps (the graphs read the seed, they do not replay a captured draw)."""
    monkeypatch.setattr(graphs, "EMULATE", True)
    runs = []
    for graphs_on in (False, True):
        torch.manual_seed(0)
        model = _apply(_model(ckpt, dropout=0.2), graphs_on=graphs_on)
        torch.manual_seed(1)  # the step seeds come from torch's generator
        runs.append(_steps(model, 5, [16]))
    gs = model.get_base_model().model.layers[0]._ts_graphs
    assert not gs.disabled and sorted(gs.layers) == [0, 1, 2]
    for (loss, grads), (want_loss, want) in zip(runs[1], runs[0], strict=True):
        assert abs(loss - want_loss) < 1e-5 * abs(want_loss)
        for k, w in want.items():
            assert torch.allclose(grads[k], w, rtol=1e-4, atol=1e-6), k


def test_dropout_outside_the_fused_layers_keeps_the_layers_eager(monkeypatch) -> None:
    monkeypatch.setattr(graphs, "EMULATE", True)
    from peft import get_peft_model

    cfg = Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    model = get_peft_model(Qwen2ForCausalLM(cfg), lora_config(LoraOptions(dropout=0.1)))
    model.train()
    # As sft() sets it up: the shared dropout (no nn.Dropout subclass) must be caught as well.
    assert share_lora_dropout(model) == 14
    apply_fast_path(model, FastOptions(lora=False, group=False, kernels=False, graphs=True))
    _steps(model, 4, [12])
    gs = model.get_base_model().model.layers[0]._ts_graphs
    assert gs.disabled == "LoRA dropout outside the fused LoRA layers" and not gs.layers


def _apply(model, graphs_on: bool):
    done = apply_fast_path(model, FastOptions(kernels=False, graphs=graphs_on))
    if graphs_on:
        assert done[-1].startswith("CUDA graphs per decoder layer")
    return model


def test_fast_options_graphs_and_embed_are_parts() -> None:
    assert FastOptions.parse("graphs,embed") == FastOptions(
        lora=False, group=False, kernels=False, loss=False, graphs=True, embed=True
    )
    assert not FastOptions.parse("auto", cuda=False).graphs


def test_host_embedding_equals_the_plain_gather() -> None:
    torch.manual_seed(3)
    emb = torch.nn.Embedding(50, 8).requires_grad_(False)
    ids = torch.randint(0, 50, (2, 7))
    want = emb(ids).clone()
    host_embedding(emb, torch.device("cpu"), pin=False)
    for _ in range(2):  # the second call reuses the host buffer
        got = emb(ids)
        assert torch.equal(got, want) and got.shape == (2, 7, 8)
    assert torch.equal(emb(ids[:, :3]), want[:, :3])


def test_a_failed_capture_leaves_the_layers_eager(monkeypatch) -> None:
    """A capture CUDA refuses switches the graphs off for the run; training goes on eagerly
    with the eager path's results."""
    monkeypatch.setattr(graphs, "EMULATE", True)
    ref = _steps(_apply(_model(True), graphs_on=False), 4, [16])

    def refuse(*_a, **_k):
        raise RuntimeError("operation not permitted when stream is capturing\nmore")

    monkeypatch.setattr(graphs, "_capture_layer", refuse)
    model = _apply(_model(True), graphs_on=True)
    got = _steps(model, 4, [16])
    gs = model.get_base_model().model.layers[0]._ts_graphs
    assert gs.disabled.startswith("capture failed: operation not permitted") and not gs.layers
    for (loss, _), (want, _) in zip(got, ref, strict=True):
        assert abs(loss - want) < 1e-5 * abs(want)


def test_aliased_parameters_are_fresh_leaves_on_the_same_storage() -> None:
    """While captured, the layer computes with aliases (own gradient accumulators, same
    storage); the parameters are back afterwards, gradients equal."""
    from tunesmith.model.fast.aliases import aliased

    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    layer[0].weight.requires_grad_(False)
    params = [p for p in layer.parameters() if p.requires_grad]
    aliases = {id(p): p.detach().requires_grad_(True) for p in params}
    x = torch.randn(5, 4)
    want = torch.autograd.grad(layer(x).square().sum(), params)
    with aliased(layer, aliases):
        assert layer[1].weight is aliases[id(params[1])]
        got = torch.autograd.grad(layer(x).square().sum(), [aliases[id(p)] for p in params])
    assert layer[1].weight is params[1] and isinstance(layer[1].weight, torch.nn.Parameter)
    assert all(a.data_ptr() == p.data_ptr() for p, a in zip(params, aliases.values(), strict=True))
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)
