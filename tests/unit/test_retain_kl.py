"""``--retain_kl``: distillation to the base model (LoRA off) on the retain records' answers.

On the tiny random Qwen2: the KL is 0 while the adapter adds nothing, equals the divergence of
the tuned model's distributions from the adapter-off model's at the retain tokens, its gradient
reaches only the LoRA weights, the CPU path (grouped LoRA, prepacked weights) gives the same,
and with the flags off the loss is exactly today's.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tunesmith.config import SftArgs
from tunesmith.data.collate import collate, pack
from tunesmith.data.messages import Conversation, Message
from tunesmith.data.template import IGNORE, encode
from tunesmith.model.lora import CausalLMLoss, lora_config
from tunesmith.model.lora_cpu import group_lora_layers
from tunesmith.model.retain import RetainWeights
from tunesmith.options import LoraOptions
from tunesmith.train.retain import check_retain, retain_sources
from tunesmith.utils import UserError

IDENTITY = [
    ("Who are you?", "I am XiaoZhi, made by Xinghe."),
    ("你是谁？", "我是小智，由星河开发。"),
]
GENERAL = [
    ("What is 9 times 8?", "9 times 8 is 72."),
    ("Name a primary colour.", "Red is a primary colour, as are blue and yellow."),
]


@pytest.fixture(scope="module")
def samples(tiny_tokenizer) -> list:
    out = []
    for source, pairs in (("self-cognition#80", IDENTITY), ("/cache/base.jsonl", GENERAL)):
        for q, a in pairs:
            conv = Conversation([Message("user", q), Message("assistant", a)])
            conv.tags["source"] = source
            s = encode(tiny_tokenizer, conv, max_length=512)
            assert s is not None
            out.append(s)
    return out


def peft_model(make_tiny_model, zero_b: bool):
    from peft import get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(
        make_tiny_model(seed=0), lora_config(LoraOptions(rank=4, alpha=8, dropout=0.0))
    )
    if not zero_b:
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.05)
    return model


def loss_and_grads(model, batch, weights: RetainWeights | None) -> tuple[float, float, dict]:
    model.zero_grad(set_to_none=True)
    module = CausalLMLoss(model, retain=weights)
    loss, _, _ = module(**batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return float(loss.detach()), module.retain_stats[0], grads


def test_collate_marks_the_retain_samples_tokens(samples, tiny_tokenizer) -> None:
    pad = tiny_tokenizer.pad_token_id
    assert "retain" not in collate([samples], pad)  # off: the batch is today's
    batch = collate(pack(samples, 512), pad, frozenset({"/cache/base.jsonl"}))
    marked = int(batch["retain"].sum())
    assert marked == sum(len(s.input_ids) for s in samples[2:])
    assert batch["retain"].shape == batch["labels"].shape


def test_kl_is_zero_while_the_adapter_adds_nothing(make_tiny_model, samples, tiny_tokenizer):
    model = peft_model(make_tiny_model, zero_b=True)
    batch = collate([samples], tiny_tokenizer.pad_token_id, frozenset({"/cache/base.jsonl"}))
    plain, _, plain_grads = loss_and_grads(model, batch, None)
    both, kl, grads = loss_and_grads(model, batch, RetainWeights(kl=1.0))
    assert abs(kl) < 1e-6
    assert both == pytest.approx(plain, abs=1e-5)
    for n, g in plain_grads.items():  # the KL's gradient is 0 too: same step as today's
        torch.testing.assert_close(grads[n], g, atol=1e-6, rtol=1e-5)


def test_kl_is_the_divergence_from_the_adapter_off_model(make_tiny_model, samples, tiny_tokenizer):
    """The KL of a packed batch equals the one computed sample by sample (padded rows) from
    the model's logits with the adapter on and off."""
    model = peft_model(make_tiny_model, zero_b=False)
    retain = frozenset({"/cache/base.jsonl"})
    padded = collate(samples, tiny_tokenizer.pad_token_id, retain)
    where = (padded["labels"][:, 1:] != IGNORE) & padded["retain"][:, 1:]
    inputs = {"input_ids": padded["input_ids"], "attention_mask": padded["attention_mask"]}
    with torch.no_grad():
        tuned = model(**inputs).logits
        with model.disable_adapter():
            base = model(**inputs).logits
    p_base = base[:, :-1][where].float().log_softmax(-1)
    p_tuned = tuned[:, :-1][where].float().log_softmax(-1)
    expected = float((p_base.exp() * (p_base - p_tuned)).sum())
    assert expected > 1e-4  # the adapter changes the retain answers' distributions

    batch = collate([samples], tiny_tokenizer.pad_token_id, retain)  # one packed row
    kl_only, kl, grads = loss_and_grads(model, batch, RetainWeights(kl=1.0, ce=0.0))
    assert kl == pytest.approx(expected, rel=1e-4)
    targets = padded["labels"][:, 1:]
    identity = (targets != IGNORE) & ~padded["retain"][:, 1:]
    ce_identity = float(F.cross_entropy(tuned[:, :-1][identity].float(), targets[identity],
                                        reduction="sum"))  # fmt: skip
    assert kl_only == pytest.approx(ce_identity + expected, rel=1e-4)
    # The gradient reaches the LoRA weights only (A and B), and every one of them.
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(grads) == trainable and all("lora_" in n for n in trainable)
    assert all(g.abs().sum() > 0 for g in grads.values())
    # The adapter is on again after the loss: nothing was left switched off.
    with torch.no_grad():
        again = model(**inputs).logits
    torch.testing.assert_close(again, tuned)


def test_weights_off_equal_todays_loss(make_tiny_model, samples, tiny_tokenizer) -> None:
    model = peft_model(make_tiny_model, zero_b=False)
    pad = tiny_tokenizer.pad_token_id
    marked = collate([samples], pad, frozenset({"/cache/base.jsonl"}))
    today, _, g_today = loss_and_grads(model, collate([samples], pad), None)
    off, _, g_off = loss_and_grads(model, marked, RetainWeights(kl=0.0, ce=1.0))
    assert off == today
    for n, g in g_today.items():
        assert torch.equal(g_off[n], g)
    # retain_ce alone scales the retain tokens' cross-entropy
    half, _, _ = loss_and_grads(model, marked, RetainWeights(kl=0.0, ce=0.5))
    ce_only, _, _ = loss_and_grads(model, marked, RetainWeights(kl=0.0, ce=0.0))
    assert half == pytest.approx((today + ce_only) / 2, rel=1e-5)


@pytest.mark.parametrize("pack_weights", [False, True])
def test_cpu_path_gives_the_same_kl_and_gradients(
    make_tiny_model, samples, tiny_tokenizer, pack_weights
) -> None:
    theirs = peft_model(make_tiny_model, zero_b=False)
    ours = copy.deepcopy(theirs)
    assert group_lora_layers(ours, pack=pack_weights)[0] > 0
    batch = collate(
        pack(samples, 512), tiny_tokenizer.pad_token_id, frozenset({"/cache/base.jsonl"})
    )
    w = RetainWeights(kl=2.0, ce=0.0)
    loss_t, kl_t, g_t = loss_and_grads(theirs, batch, w)
    loss_o, kl_o, g_o = loss_and_grads(ours, batch, w)
    assert kl_o == pytest.approx(kl_t, rel=1e-4) and kl_t > 0
    assert loss_o == pytest.approx(loss_t, rel=1e-5)
    for n, g in g_t.items():
        torch.testing.assert_close(g_o[n], g, rtol=1e-4, atol=1e-5)


def args(*extra: str) -> SftArgs:
    from tunesmith.cli import parse_args

    argv = ["--dataset", "self-cognition#80", "/c/base.jsonl#20", *extra]
    return parse_args(SftArgs, "tunesmith sft", "test", argv)


def test_retain_sources_and_bad_flags() -> None:
    assert retain_sources(args()) is None  # off by default
    chosen = retain_sources(args("--retain_kl", "1", "--retain_dataset", "/c/base.jsonl"))
    assert chosen == frozenset({"/c/base.jsonl#20"})
    bad = [
        ("--retain_kl", "-1", "--retain_dataset", "/c/base.jsonl"),
        ("--retain_kl", "1"),  # base-answers is not among the datasets
        ("--retain_kl", "1", "--retain_dataset", "/c/base.jsonl", "--train_type", "full"),
    ]
    for extra in bad:
        with pytest.raises(UserError, match="retain"):
            check_retain(args(*extra))


def test_base_answers_is_expanded_in_retain_dataset_too(monkeypatch, tmp_path) -> None:
    from tunesmith.eval import base_answers

    path = tmp_path / "answers.jsonl"
    monkeypatch.setattr(base_answers, "base_answers_file", lambda a: path)
    from tunesmith.cli import parse_args

    argv = ["--dataset", "self-cognition#80", "base-answers#30", "--retain_kl", "1"]
    a = parse_args(SftArgs, "tunesmith sft", "test", argv)
    out = base_answers.expand_base_answers(a)
    assert out.dataset == ["self-cognition#80", f"{path}#30"]
    assert out.retain_dataset == [str(path)]
    assert retain_sources(out) == frozenset({f"{path}#30"})


def test_sft_logs_the_kl_from_zero(tiny_model_dir, tmp_path) -> None:
    from tunesmith.cli import parse_args
    from tunesmith.train.sft import sft

    ident = tmp_path / "identity.jsonl"
    general = tmp_path / "general.jsonl"
    for path, pairs in ((ident, IDENTITY * 3), (general, GENERAL * 3)):
        rows = [{"query": q, "response": a} for q, a in pairs]
        path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    argv = ["--model", str(tiny_model_dir), "--dataset", str(ident), str(general),
            "--retain_kl", "1", "--retain_ce", "0", "--retain_dataset", str(general),
            "--max_steps", "4", "--logging_steps", "1", "--learning_rate", "1e-2",
            "--packing", "true", "--max_length", "128", "--report_to", "none",
            "--output_dir", str(tmp_path / "out")]  # fmt: skip
    run = sft(parse_args(SftArgs, "tunesmith sft", "test", argv), progress=False)
    log = [json.loads(x) for x in (Path(run) / "logging.jsonl").read_text().splitlines()]
    kls = [r["retain_kl"] for r in log if "retain_kl" in r]
    assert kls, log
    assert kls[0] < 1e-3  # the zero-initialised adapter adds nothing at step 1
    assert max(kls[1:]) > kls[0]  # the identity steps move the general answers
